"""One training run from plain options: fit -> evaluate on the test split -> report -> bundle.

``RunOptions`` is what ``modalforge train`` takes from flags or a YAML file; it is saved resolved
as ``run.yaml`` in the run folder (like timm's ``args.yaml``). ``sweep`` and ``cv`` call this too.
Which predictor the options build is the task registry's business (``tasks.implied_task``: the
``--task`` given, else the one its flags imply -- ``--pairs`` is contrastive, ``--caption`` is
captioning -- else a classifier or regressor, guessed from the label).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from modalforge.data.dataset import Augment
from modalforge.data.manifest import Manifest
from modalforge.files import atomic_write_json, atomic_write_text
from modalforge.models import EncoderSpec
from modalforge.models.multimodal import renamed_fusion_kwargs
from modalforge.tasks.base import DEFAULT_ENCODERS, FitConfig, TaskPredictor
from modalforge.train.module import OptimConfig

#: options that were renamed, old name -> what it sets now (read with a deprecation message)
RENAMED = {"hidden": ("fusion_out_dim", "decoder_dim")}

# what --augment turns on: mild, label-preserving changes
DEFAULT_AUGMENT = Augment(image_crop=0.15, image_jitter=0.2, audio_noise=0.05, audio_gain_db=6,
                          audio_shift=0.1, text_token_dropout=0.1)  # fmt: skip


@dataclass
class RunOptions:
    manifest: str
    label: str | None = None  # required but for --task contrastive (there: stratifies the split)
    out: str = "runs/run"
    task: str | None = None  # a trainable task of the registry (None: implied or guessed)
    # contrastive: the columns aligned with each other, e.g. ["image:text", "audio:text"]
    pairs: list[str] | None = None
    embed_dim: int = 256  # contrastive: the shared embedding width
    projection: str = "mlp"  # contrastive: each tower's projection head (mlp | linear)
    projection_dropout: float = 0.0  # contrastive: dropout inside the mlp heads
    zero_shot: list[str] | None = None  # contrastive: columns classified zero-shot (None: label)
    evaluate_by: str | None = None  # a column whose groups get their own accuracy (VQA: qtype)
    caption: str | None = None  # caption: the column of captions (the image: columns[0] or "image")
    decoder: str = "transformer"  # caption: transformer | gru (Show-Attend-Tell)
    decoder_layers: int = 2  # caption: transformer layers (width: decoder_dim)
    decoder_dropout: float = 0.3  # caption
    # the task's own settings, passed to its options builder (chat: llm, image_tokens,
    # stage1_epochs, lora, max_per_type, ...; see the task module's from_options)
    task_options: dict[str, Any] = field(default_factory=dict)
    fusion: str = "concat"
    fusion_kwargs: dict[str, Any] = field(default_factory=dict)
    # column or modality -> encoder name, e.g. {"image": "efficientnet_lite0"}
    encoders: dict[str, str] = field(default_factory=dict)
    # column or modality -> constructor arguments, e.g. {"image": {"image_size": 128}}
    encoder_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # frozen | top:N | full (None: pretrained frozen, others full), for every encoder or per
    # column / modality, e.g. {"image": "top:4", "text": "top:2"} (LiT: {"image": "frozen"})
    finetune: str | dict[str, str] | None = None
    columns: list[str] | None = None
    # column -> type, "?" = optional (may be missing at prediction time), e.g. {"audio": "audio?"};
    # columns not named here are inferred
    schema: dict[str, str] | None = None
    fusion_out_dim: int = 256  # classification / regression: the fused vector's width
    decoder_dim: int = 256  # caption: the decoder's width
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    encoder_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    patience: int = 5
    loss: str | None = None  # ce | focal (classification), mse | huber (regression)
    label_smoothing: float = 0.0
    class_weights: str = "none"
    modality_dropout: float = 0.0
    augment: bool = False
    seed: int = 0
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | None = None
    cache_dir: str | None = None
    on_bad_row: str = "skip"
    resume: bool = False
    save_bundle: bool = True
    #: deprecated: the width ``fusion_out_dim`` and ``decoder_dim`` now name (sets both)
    hidden: int | None = None

    def __post_init__(self) -> None:
        for old, new in RENAMED.items():
            value = getattr(self, old)
            if value is not None:
                warnings.warn(f"option {old!r} is deprecated: it sets {' and '.join(new)} "
                              f"(use those)", FutureWarning, stacklevel=3)  # fmt: skip
                for name in new:
                    setattr(self, name, value)
                setattr(self, old, None)
        if "hidden" in self.fusion_kwargs:
            warnings.warn("fusion_kwargs 'hidden' is deprecated: it is the fusion's 'width'",
                          FutureWarning, stacklevel=3)  # fmt: skip
            self.fusion_kwargs = renamed_fusion_kwargs(self.fusion_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The resolved options (what ``run.yaml`` holds; renamed options left out)."""
        return {k: v for k, v in asdict(self).items() if k not in RENAMED}

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunOptions:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
        for old, new in RENAMED.items():
            if old in data:
                warnings.warn(f"{path}: {old!r} is deprecated: it sets {' and '.join(new)} "
                              "(use those)", FutureWarning, stacklevel=2)  # fmt: skip
                value = data.pop(old)
                for name in new:
                    data.setdefault(name, value)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def _finetune(self, key: str) -> str | None:
        if isinstance(self.finetune, dict):
            return self.finetune.get(key)
        return self.finetune

    def predictor(self) -> TaskPredictor:
        """The predictor these options describe: the task's own (``tasks.registry``)."""
        from modalforge.schema import Modality, Schema
        from modalforge.tasks import get, implied_task

        names = dict(self.encoders)
        specs: dict[str, EncoderSpec] = {}
        for key in sorted(set(names) | set(self.encoder_kwargs)):
            default = (
                DEFAULT_ENCODERS.get(Modality(key)) if key in {m.value for m in Modality} else None
            )
            name = names.get(key) or (default.name if default else None)
            if name is None:
                raise ValueError(f"encoder_kwargs for {key!r} but no encoder named for it")
            kwargs = dict(default.kwargs) if default and default.name == name else {}
            kwargs.update(self.encoder_kwargs.get(key, {}))
            specs[key] = EncoderSpec(name, kwargs, self._finetune(key))
        if self.finetune is not None:  # also applies to the default encoders
            for modality, spec in DEFAULT_ENCODERS.items():
                mode = self._finetune(modality.value)
                if mode is not None:
                    default = EncoderSpec(spec.name, dict(spec.kwargs), mode)
                    specs.setdefault(modality.value, default)
        optim = OptimConfig(lr=self.lr, encoder_lr=self.encoder_lr, weight_decay=self.weight_decay,
                            warmup_ratio=self.warmup_ratio, loss=self.loss or "ce",
                            label_smoothing=self.label_smoothing,
                            modality_dropout=self.modality_dropout)  # fmt: skip
        fit = FitConfig(epochs=self.epochs, batch_size=self.batch_size, patience=self.patience,
                        class_weights=self.class_weights, seed=self.seed,
                        accelerator=self.accelerator, devices=self.devices, strategy=self.strategy,
                        num_nodes=self.num_nodes, precision=self.precision, optim=optim,
                        augment=DEFAULT_AUGMENT if self.augment else Augment())  # fmt: skip
        schema = None
        if self.schema:
            schema = Schema.from_specs(f"{name}={kind}" for name, kind in self.schema.items())
        spec = get(implied_task(self) or "classification")
        if spec.options is None:
            raise ValueError(f"--task {spec.name}: not trained by modalforge train")
        return spec.resolve("options")(self, specs, fit, schema)


def train_run(
    options: RunOptions, progress: bool = True, manifest: Manifest | None = None
) -> dict[str, Any]:
    """Fit, evaluate on the held-out test split, write the report and the bundle.

    ``manifest``: an already-read manifest to use instead of ``options.manifest`` (sweeps and
    folds pass one whose ``split`` column fixes the split). Returns a summary: the run folder,
    metrics, timings and parameter counts, and the fitted ``predictor``.
    """
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run.yaml", yaml.safe_dump(options.to_dict(), sort_keys=False))
    data = manifest if manifest is not None else options.manifest
    predictor = options.predictor().fit(data, out_dir=out, resume=options.resume,
                                        progress=progress)  # fmt: skip
    test = predictor.test_manifest
    summary: dict[str, Any] = {"run": str(out), "history": predictor.history}
    rank = getattr(predictor, "rank", 0)
    if rank != 0:  # a DDP worker: rank 0 evaluates and writes the report and the bundle
        return {**summary, "rank": rank, "processes": predictor.processes, "predictor": predictor}
    if test is not None and len(test):
        extra = {"zero_shot": options.zero_shot} if options.zero_shot else {}
        if options.evaluate_by:
            extra["by"] = options.evaluate_by
        result = predictor.evaluate(test, out_dir=out / "report", **extra)
        summary.update(result)
    if options.save_bundle:
        bundle = predictor.save(out / "bundle", metrics=summary.get("headline"), overwrite=True)
        summary["bundle"] = str(bundle.path)
    atomic_write_json(out / "summary.json", summary, point="summary", default=str)
    summary["predictor"] = predictor
    return summary
