"""One training run from plain options: fit -> evaluate on the test split -> report -> bundle.

``RunOptions`` is what ``modalforge train`` takes from flags or a YAML file; it is saved resolved
as ``run.yaml`` in the run folder (like timm's ``args.yaml``). ``sweep`` and ``cv`` call this too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from modalforge.data.dataset import Augment
from modalforge.data.manifest import Manifest
from modalforge.models import EncoderSpec
from modalforge.predictor import FitConfig, MultimodalPredictor
from modalforge.train.module import OptimConfig

# what --augment turns on: mild, label-preserving changes
DEFAULT_AUGMENT = Augment(image_crop=0.15, image_jitter=0.2, audio_noise=0.05, audio_gain_db=6,
                          audio_shift=0.1, text_token_dropout=0.1)  # fmt: skip


@dataclass
class RunOptions:
    manifest: str
    label: str | None = None  # required but for --task contrastive (there: stratifies the split)
    out: str = "runs/run"
    task: str | None = None  # classification | regression | contrastive | caption (None: guessed)
    # contrastive: the columns aligned with each other, e.g. ["image:text", "audio:text"]
    pairs: list[str] | None = None
    embed_dim: int = 256  # contrastive: the shared embedding width
    projection: str = "mlp"  # contrastive: each tower's projection head (mlp | linear)
    projection_dropout: float = 0.0  # contrastive: dropout inside the mlp heads
    zero_shot: list[str] | None = None  # contrastive: columns classified zero-shot (None: label)
    evaluate_by: str | None = None  # a column whose groups get their own accuracy (VQA: qtype)
    caption: str | None = None  # caption: the column of captions (the image: columns[0] or "image")
    decoder: str = "transformer"  # caption: transformer | gru (Show-Attend-Tell)
    decoder_layers: int = 2  # caption: transformer layers (width: hidden)
    decoder_dropout: float = 0.3  # caption
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
    hidden: int = 256
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

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunOptions:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def _finetune(self, key: str) -> str | None:
        if isinstance(self.finetune, dict):
            return self.finetune.get(key)
        return self.finetune

    def predictor(self) -> MultimodalPredictor:
        names = dict(self.encoders)
        specs: dict[str, EncoderSpec] = {}
        from modalforge.predictor import DEFAULT_ENCODERS
        from modalforge.schema import Modality

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
        loss = self.loss or ("ce" if self.task != "regression" else "mse")
        optim = OptimConfig(lr=self.lr, encoder_lr=self.encoder_lr, weight_decay=self.weight_decay,
                            warmup_ratio=self.warmup_ratio, loss=loss,
                            label_smoothing=self.label_smoothing,
                            modality_dropout=self.modality_dropout)  # fmt: skip
        fit = FitConfig(epochs=self.epochs, batch_size=self.batch_size, patience=self.patience,
                        class_weights=self.class_weights, seed=self.seed,
                        accelerator=self.accelerator, devices=self.devices, strategy=self.strategy,
                        num_nodes=self.num_nodes, precision=self.precision, optim=optim,
                        augment=DEFAULT_AUGMENT if self.augment else Augment())  # fmt: skip
        from modalforge.schema import Schema

        schema = None
        if self.schema:
            schema = Schema.from_specs(f"{name}={kind}" for name, kind in self.schema.items())
        if self.task == "contrastive":
            from modalforge.contrastive import ContrastivePredictor

            return ContrastivePredictor(self.pairs or [], label=self.label, encoders=specs,
                                        schema=schema, embed_dim=self.embed_dim,
                                        projection=self.projection,
                                        dropout=self.projection_dropout, fit_config=fit,
                                        cache_dir=self.cache_dir,
                                        on_bad_row=self.on_bad_row)  # fmt: skip
        if self.task == "caption":
            from modalforge.caption import DEFAULT_ENCODER, CaptionPredictor

            if not self.caption:
                raise ValueError("--task caption needs the caption column (--caption)")
            image = (self.columns or ["image"])[0]
            spec = specs.get(image) or specs.get("image") or DEFAULT_ENCODER
            return CaptionPredictor(image, self.caption, spec, decoder=self.decoder,
                                    dim=self.hidden, layers=self.decoder_layers,
                                    dropout=self.decoder_dropout, fit_config=fit,
                                    cache_dir=self.cache_dir, schema=schema,
                                    on_bad_row=self.on_bad_row)  # fmt: skip
        if not self.label:
            raise ValueError("a label column is needed (--label), except for --task contrastive "
                             "and caption")  # fmt: skip
        return MultimodalPredictor(label=self.label, task=self.task, fusion=self.fusion,
                                   fusion_kwargs=self.fusion_kwargs, encoders=specs,
                                   columns=self.columns, schema=schema, hidden=self.hidden,
                                   fit_config=fit,
                                   cache_dir=self.cache_dir,
                                   on_bad_row=self.on_bad_row)  # fmt: skip


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
    (out / "run.yaml").write_text(yaml.safe_dump(asdict(options), sort_keys=False))
    data = manifest if manifest is not None else options.manifest
    predictor = options.predictor().fit(data, out_dir=out, resume=options.resume,
                                        progress=progress)  # fmt: skip
    test = predictor.test_manifest
    summary: dict[str, Any] = {"run": str(out), "history": predictor.history}
    if test is not None and len(test):
        extra = {"zero_shot": options.zero_shot} if options.zero_shot else {}
        if options.evaluate_by:
            extra["by"] = options.evaluate_by
        result = predictor.evaluate(test, out_dir=out / "report", **extra)
        summary.update(result)
    if options.save_bundle:
        bundle = predictor.save(out / "bundle", metrics=summary.get("headline"), overwrite=True)
        summary["bundle"] = str(bundle.path)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["predictor"] = predictor
    return summary
