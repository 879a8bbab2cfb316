"""The Lightning loop every task trains through: checkpoints (best and last), early stopping,
``--resume``, CSV + TensorBoard logs, progress bars, mixed precision on CUDA.

    history = fit_module(module, train_loader, val_loader, run_dir, settings, "val_acc", "max")

Tasks build the LightningModule and the loaders; this module knows nothing about what they
train.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class LoopSettings:
    """The trainer's knobs (from ``FitConfig``)."""

    epochs: int
    patience: int
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | None = None  # None: 16-mixed on CUDA, 32 elsewhere


def quiet_lightning() -> None:
    """Lightning's start-up chatter (accelerator lines, tips) and two warnings that do not apply:
    frozen encoders are meant to be in eval mode; the LeafSpec one is torch-internal."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def atomic_checkpoint_io():
    """Lightning's ``TorchCheckpointIO``, but each checkpoint is written through
    :func:`modalforge.files.atomic_write_bytes`: to a temporary in the checkpoint's own folder,
    fsynced, then renamed over it. (Lightning's own transaction writes the temporary to
    ``$TMPDIR`` and moves it across, which is a copy, not a rename, when that is another file
    system; and a kill leaves the temporary behind.) ``last.ckpt`` is therefore always the last
    *complete* checkpoint, which is what ``--resume`` continues from."""
    import io

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from modalforge.files import atomic_write_bytes, crash_point, remove_stale_temps

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(path.parent)
            # crash points checkpoint.last.partial / .rename / .saved (and best)
            atomic_write_bytes(path, buffer.getvalue(), point=f"checkpoint.{path.stem}")
            crash_point(f"checkpoint.{path.stem}.saved")

    return AtomicCheckpointIO()


def _checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint was saved at, or a clear error naming the file."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
    except Exception as err:  # torch raises several kinds for a damaged file
        raise ValueError(
            f"{path}: cannot read this checkpoint to resume from ({type(err).__name__}: {err}); "
            "delete it to start the run again, or train without --resume"
        ) from err


def fit_module(
    module,
    train_loader,
    val_loader,
    run: Path,
    settings: LoopSettings,
    monitor: str,
    mode: str,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``module`` (a LightningModule with a ``model``) and load its best checkpoint back
    into it. Checkpoints go to ``run/checkpoints`` (``best.ckpt`` by ``monitor``, ``last.ckpt``
    every epoch, which ``resume`` continues from). Returns the loop's part of the history:
    epochs run, the epoch resumed from, the best checkpoint and score, the training time."""
    import lightning as L

    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=run / "checkpoints", filename="best", monitor=monitor, mode=mode
        ),
        # Lightning's save_last only copies a checkpoint when the monitored one is saved; a
        # resume needs the true last epoch, so a second, unmonitored checkpoint keeps it
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=run / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
        ),
        L.pytorch.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=settings.patience),
    ]
    if progress:
        callbacks.append(L.pytorch.callbacks.RichProgressBar())
    loggers = [L.pytorch.loggers.CSVLogger(run, name="logs", version="")]
    with contextlib.suppress(ModuleNotFoundError):  # no tensorboard(X): CSV logs only
        loggers.append(L.pytorch.loggers.TensorBoardLogger(run, name="tensorboard", version=""))
    precision = settings.precision or ("16-mixed" if torch.cuda.is_available() else "32-true")
    quiet_lightning()
    strategy: Any = settings.strategy
    if strategy == "ddp":
        # a batch without one modality leaves that tower's / projector's parameters without a
        # gradient on its rank; plain DDP then waits forever for their all-reduce (measured: the
        # chat task's image-only and audio-only batches hung both ranks), so DDP is told to look
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=True)
    trainer = L.Trainer(
        max_epochs=settings.epochs, accelerator=settings.accelerator, devices=settings.devices,
        strategy=strategy, num_nodes=settings.num_nodes, precision=precision,
        callbacks=callbacks, logger=loggers, enable_progress_bar=progress,
        enable_model_summary=False, deterministic="warn", log_every_n_steps=5,
        default_root_dir=run, plugins=[atomic_checkpoint_io()],
    )  # fmt: skip
    ckpt = run / "checkpoints" / "last.ckpt"
    resumed_from = None
    if resume and ckpt.is_file():
        # our own checkpoint, written (atomically) by this run's Lightning trainer
        resumed_from = _checkpoint_epoch(ckpt)
    t0 = time.perf_counter()
    trainer.fit(module, train_loader, val_loader,
                ckpt_path=str(ckpt) if resumed_from is not None else None)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    best = callbacks[0].best_model_path
    if best:  # our own checkpoint
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    score = callbacks[0].best_model_score
    return {
        "epochs_run": int(trainer.current_epoch),
        "resumed_from_epoch": resumed_from,
        "best_checkpoint": best,
        "best_score": None if score is None else float(score),
        "monitor": monitor,
        "train_seconds": round(train_seconds, 3),
        # under DDP every process runs this; only rank 0 goes on to evaluate and write
        "rank": int(trainer.global_rank),
        "processes": int(trainer.world_size),
    }


__all__ = ["LoopSettings", "atomic_checkpoint_io", "fit_module", "quiet_lightning"]
