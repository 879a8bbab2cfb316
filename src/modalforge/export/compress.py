"""PyTorch variants of a bundle: pruned weights, or a distilled student -- each trained a little
more, checked against the original on held-out rows like every variant, and added only when it
passes its gate.

    prune_bundle("runs/demo/bundle", manifest, held_out, amount=0.3)        # adds "pruned"
    distill_bundle("runs/demo/bundle", "configs/student.yaml", manifest, held_out)

``manifest`` holds the rows to train on: its ``split`` column (or the same seeded split the
teacher's training made) keeps the held-out rows out of the fine-tune / the student's training.
``held_out`` are the rows the gate checks (``modalforge export --split test``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modalforge.export.parity import GATES, Gate, compare, gate


def _check_and_add(bundle, name: str, reference, candidate, held_out, label, rule: Gate,
                   files: dict[str, Path], info: dict[str, Any],
                   overwrite: bool) -> dict[str, Any]:  # fmt: skip
    from modalforge.bundle import add_variant
    from modalforge.export.parity import ParityGateError

    result = compare(reference, candidate, held_out, label)
    problems = gate(result, rule)
    info["parity"] = {**result, "gate": asdict(rule), "passed": not problems}
    if problems:
        raise ParityGateError(name, problems, result, info)
    add_variant(bundle, name, files, info, overwrite=overwrite)
    return info


def _optim_from_bundle(predictor, **overrides):
    """The bundle's training optimizer settings (so a fine-tune keeps its loss, label
    smoothing, modality dropout), with ``overrides``."""
    from modalforge.train.module import OptimConfig

    saved = ((predictor.bundle.extra.get("fit") or {}).get("optim")) or {}
    known = {f.name for f in dataclasses.fields(OptimConfig)}
    return OptimConfig(**{**{k: v for k, v in saved.items() if k in known}, **overrides})


def prune_bundle(
    bundle: str | Path,
    manifest,
    held_out,
    amount: float,
    structured: bool = False,
    epochs: int = 3,
    lr: float = 1e-4,
    name: str = "pruned",
    rule: Gate | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Magnitude-prune every encoder and the fusion (each part on its own, so ``amount`` is
    each one's share: a global threshold over a CNN and a transformer together would empty the
    one with the smaller weights), fine-tune ``epochs`` with the masks attached (frozen encoders
    keep their pruned weights; the layers that train keep their zeros), then gate and add the
    weights as variant ``name`` (format ``safetensors``). Structured pruning leaves the
    classifier (its rows are the classes) and depthwise convolutions alone."""
    from modalforge.bundle import write_weights
    from modalforge.export.prune import magnitude_prune, make_permanent, sparsity_report
    from modalforge.runtime.engine import Engine
    from modalforge.tasks import for_bundle, load
    from modalforge.tasks.registry import PRUNE

    if not 0 < amount < 1:
        raise ValueError(f"--prune amount must be between 0 and 1, got {amount}")
    start = time.perf_counter()
    predictor = load(bundle)
    if not for_bundle(predictor.bundle).can(PRUNE):
        raise ValueError(f"{bundle}: pruning needs a classification bundle")
    reference = Engine(load(bundle), device="cpu")
    model = predictor.model
    parts = {f"encoder:{c}": model.encoder(c) for c in model.columns}
    parts["fusion"] = model.fusion
    if not structured:
        parts["head"] = model.head
    for part in parts.values():
        magnitude_prune(part, amount, structured=structured, permanent=False)
    for column in model.columns:  # frozen encoders do not train: fold their masks now
        if model.encoder(column).frozen:
            make_permanent(model.encoder(column))
    predictor.mark_weights(f"pruned-{amount}")  # features of the pruned encoders, not cached ones
    finetune: dict[str, Any] = {"epochs": 0}
    if epochs > 0:
        predictor.fit_config = dataclasses.replace(
            predictor.fit_config, epochs=epochs, patience=epochs,
            optim=_optim_from_bundle(predictor, lr=lr, warmup_ratio=0.0),
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="modalforge-prune-") as run:
            predictor.finetune(manifest, out_dir=run, progress=progress)
        finetune = {"epochs": predictor.history["epochs_run"], "lr": lr,
                    "best_val_acc": predictor.history["best_score"],
                    "seconds": predictor.history["train_seconds"]}  # fmt: skip
    make_permanent(model)
    model.eval()
    report = {key: sparsity_report(part)["global"] for key, part in parts.items()}
    report["model"] = sparsity_report(model)["model"]
    candidate = Engine(predictor, device="cpu", variant=name)
    info = {"format": "safetensors", "source": "pytorch",
            "pruning": {"amount": amount, "structured": structured, "method": "magnitude (L1 "
                        "unstructured per part)" if not structured else "L2 output channels"},
            "finetune": finetune, "sparsity": report,
            "export_seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="modalforge-prune-") as tmp:
        weights = write_weights(model.state_dict(), Path(tmp) / "model.safetensors")
        return _check_and_add(bundle, name, reference, candidate, held_out,
                              predictor.label, rule or GATES["pruned"],
                              {f"{name}/model.safetensors": weights}, info, overwrite)  # fmt: skip


def distill_bundle(
    bundle: str | Path,
    config: str | Path,
    manifest,
    held_out,
    temperature: float = 2.0,
    alpha: float = 0.5,
    name: str = "distilled",
    rule: Gate | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the student that run config ``config`` describes (``modalforge train``'s YAML:
    encoders, fusion, epochs, ...) on ``manifest`` against the bundle's labels and its soft
    targets at ``temperature`` (loss = alpha * T^2 * KL + (1 - alpha) * cross-entropy), gate it
    against the bundle on ``held_out`` and add it as variant ``name`` (format ``bundle``: the
    student's own bundle in the folder ``name``)."""
    from modalforge.experiments.run import RunOptions
    from modalforge.runtime.engine import Engine
    from modalforge.tasks import for_bundle, load
    from modalforge.tasks.registry import DISTILL

    start = time.perf_counter()
    teacher = load(bundle)
    if not for_bundle(teacher.bundle).can(DISTILL):
        raise ValueError(f"{bundle}: distillation needs a classification bundle")
    options = RunOptions.from_yaml(config, manifest="-", label=teacher.label)
    student = options.predictor()
    student.fit_config.optim.distill_alpha = alpha
    student.fit_config.optim.distill_temperature = temperature
    with tempfile.TemporaryDirectory(prefix="modalforge-distill-") as tmp:
        student.fit(manifest, out_dir=Path(tmp) / "run", progress=progress, teacher=teacher)
        reference = Engine(teacher, device="cpu")
        candidate = Engine(student, device="cpu", variant=name)
        params = {"teacher": sum(p.numel() for p in teacher.model.parameters()),
                  "student": sum(p.numel() for p in student.model.parameters())}  # fmt: skip
        saved = student.save(Path(tmp) / "student")
        files = {f"{name}/{f}": saved.path / f for f in ("modalforge.json", *saved.files)}
        info = {"format": "bundle", "folder": name, "config": str(config),
                "distillation": {"temperature": temperature, "alpha": alpha},
                "student": {"encoders": {c: student.model.encoder(c).name
                                         for c in student.model.columns},
                            "fusion": student.fusion, "history": student.history},
                "params": params,
                "export_seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
        return _check_and_add(bundle, name, reference, candidate, held_out, teacher.label,
                              rule or GATES["distilled"], files, info, overwrite)  # fmt: skip
