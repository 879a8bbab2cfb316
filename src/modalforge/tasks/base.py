"""``TaskPredictor``: what every trainable task shares -- data in, schema, split, features
through the on-disk cache, batches, the training loop, bundles.

A task subclasses it and fills in its hooks (``_build`` / ``_new_model`` / ``_module`` /
``_targets`` and the few properties below); ``tasks.load`` rebuilds any of them from a bundle.
Frozen encoders read their features from the on-disk cache (``data.cache``), so only what is
trained runs over them; encoders that train see raw, augmented inputs every epoch.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modalforge.data.cache import FeatureCache
from modalforge.data.dataset import Augment, Featurizer, MultimodalDataset, collate
from modalforge.data.infer import infer_schema
from modalforge.data.manifest import Manifest, is_missing, read_manifest
from modalforge.data.split import stratified_split
from modalforge.data.text import WordVocab
from modalforge.data.validate import apply_policy, validate_manifest
from modalforge.encoders.base import weights_fingerprint
from modalforge.encoders.features import encode_items, load_items
from modalforge.files import atomic_write_json
from modalforge.models import EncoderSpec
from modalforge.schema import Modality, Schema
from modalforge.train.loop import LoopSettings, fit_module
from modalforge.train.module import OptimConfig

# what reads each modality unless told otherwise
DEFAULT_ENCODERS: dict[Modality, EncoderSpec] = {
    Modality.IMAGE: EncoderSpec("efficientnet_lite0", {"image_size": 224}),
    Modality.TEXT: EncoderSpec("minilm"),
    Modality.AUDIO: EncoderSpec("whisper_tiny_en"),
    Modality.TABULAR: EncoderSpec("tabular_mlp", {"n_features": 1}),
}
WORD_ENCODERS = {"gru", "lstm", "bag_of_embeddings"}


def default_cache_dir() -> Path:
    from modalforge.files import cache_dir

    return cache_dir() / "features"


@dataclass
class FitConfig:
    """Training settings; saved as ``config.json`` in the run folder and in the bundle."""

    epochs: int = 30
    batch_size: int = 64
    patience: int = 5  # early stopping on the validation metric
    monitor: str = "val_acc"  # val_acc (classification), val_recall (contrastive) or val_loss
    class_weights: str = "none"  # none | balanced
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | None = None  # None: 16-mixed on CUDA, 32 elsewhere
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: Augment = field(default_factory=Augment)

    def loop(self) -> LoopSettings:
        return LoopSettings(self.epochs, self.patience, self.accelerator, self.devices,
                            self.strategy, self.num_nodes, self.precision)  # fmt: skip


Data = str | Path | Manifest | pd.DataFrame | list


class TaskPredictor:
    """The shared pipeline. ``task`` is the string written into bundles."""

    #: what the task's model does instead of ``predict`` (None: it predicts)
    instead_of_predict: str | None = None

    def __init__(
        self,
        label: str,
        task: str | None = None,
        encoders: dict[str, EncoderSpec | str] | None = None,
        columns: list[str] | None = None,
        schema: Schema | None = None,
        fit_config: FitConfig | None = None,
        cache_dir: str | Path | None = None,
        on_bad_row: str = "skip",
    ) -> None:
        self.label = label
        self.task = task
        # keys: a column name or a modality name ("image"); values: spec or encoder name
        self.encoder_overrides = {
            k: EncoderSpec(v) if isinstance(v, str) else v for k, v in (encoders or {}).items()
        }
        self.columns = columns
        self.declared_schema = schema
        self.fit_config = fit_config or FitConfig()
        self.cache = FeatureCache(cache_dir or default_cache_dir())
        self.on_bad_row = on_bad_row
        # set by fit / load
        self.schema: Schema | None = None
        self.labels: list[str] | None = None
        self.config: Any = None
        self.model: Any = None
        self.vocabs: dict[str, WordVocab] = {}
        self.featurizers: dict[str, Featurizer] = {}
        self.history: dict[str, Any] = {}
        self.run_dir: Path | None = None
        # this process's DDP rank in the last fit (0: the one that writes), of how many
        self.rank, self.processes = 0, 1
        self.test_manifest: Manifest | None = None  # the held-out rows of the last fit
        self.bundle = None  # the Bundle a loaded predictor came from

    # ------------------------------------------------------------------ what a task fills in
    def _build(self, inputs: dict[str, EncoderSpec]) -> None:
        """``self.config`` and ``self.model`` for these input encoders."""
        raise NotImplementedError

    def _new_model(self):
        """The architecture ``self.config`` describes, freshly initialized."""
        raise NotImplementedError

    def _module(self, class_weights: torch.Tensor | None):
        """The LightningModule that trains ``self.model``."""
        raise NotImplementedError

    def _targets(self, manifest: Manifest) -> list | None:
        """What each row is trained towards (None: the batches carry it, or nothing)."""
        return None

    def _prepare_labels(self, manifest: Manifest) -> None:
        """Set ``self.task`` / ``self.labels`` from the training rows, where the task has them."""

    @property
    def _stratify(self) -> bool:
        """Whether a seeded split keeps the label's values balanced across train / val / test."""
        return True

    def _monitor(self) -> str:
        """The validation metric early stopping and the best checkpoint watch."""
        return "val_loss"

    def _class_weights(self, train_m: Manifest) -> torch.Tensor | None:
        return None

    def _soft_targets(self, teacher, train_m: Manifest, val_m: Manifest, progress: bool):
        raise ValueError(
            "distillation needs a classification teacher with the student's labels "
            f"(teacher: {getattr(teacher, 'labels', None)}, student: {self.labels})"
        )

    def _known_rows(self, manifest: Manifest) -> Manifest:
        """The rows a loaded model can score (a classifier: rows with labels it knows)."""
        return manifest

    def _row_tensors(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        """Per-row tensors (first dimension: the manifest's rows) that batches carry."""
        return {}

    def _assets(self) -> dict[str, Any]:
        """JSON files the bundle carries beside the weights (word vocabularies)."""
        return {f"vocab.{c}.json": v.to_dict() for c, v in self.vocabs.items()}

    def _restore(self, bundle) -> None:
        """Read back what ``_assets`` wrote (before the model is rebuilt)."""
        self.vocabs = {
            name[len("vocab.") : -len(".json")]: WordVocab.from_dict(bundle.asset(name))
            for name in bundle.assets
            if name.startswith("vocab.")
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], label: str | None, task: str,
                    cache_dir=None) -> TaskPredictor:  # fmt: skip
        """A predictor for a bundle's ``model_config`` (no weights yet)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data in
    def _manifest(self, data: Data, root: str | Path | None = None) -> Manifest:
        if isinstance(data, Manifest):
            return data
        if isinstance(data, pd.DataFrame):
            return Manifest(data.reset_index(drop=True), Path(root or "."), None)
        if isinstance(data, list):
            return Manifest(pd.DataFrame(data), Path(root or "."), None)
        return read_manifest(data, root)

    def _clean(self, manifest: Manifest, schema: Schema, progress: bool = True) -> Manifest:
        report = validate_manifest(manifest, schema, progress=progress)
        if not report.ok:
            print(f"manifest check: {report.summary()}")
            for line in report.lines(limit=10):
                print(f"  {line}")
        return apply_policy(manifest, report, self.on_bad_row)  # type: ignore[arg-type]

    def _resolve_schema(self, manifest: Manifest) -> Schema:
        schema = infer_schema(manifest, label=self.label, declared=self.declared_schema)
        inputs = [c for c in schema.inputs if self.columns is None or c.name in self.columns]
        if self.columns is not None:
            unknown = sorted(set(self.columns) - {c.name for c in inputs})
            if unknown:
                raise ValueError(f"input columns not in the manifest's schema: {unknown}")
        if not inputs:
            raise ValueError("no input columns: declare them with a schema or --column")
        if not self.label:  # a task without one (contrastive)
            return Schema(tuple(inputs))
        # the label column must be required: rows without a label cannot train
        label = replace(schema[self.label], required=True)
        return Schema(tuple([*inputs, label]))

    def _encoder_spec(self, column: str, modality: Modality, texts: list[str]) -> EncoderSpec:
        spec = self.encoder_overrides.get(column) or self.encoder_overrides.get(modality.value)
        if spec is None:
            if modality not in DEFAULT_ENCODERS:
                raise ValueError(f"column {column!r} ({modality.value}) needs an explicit encoder")
            spec = DEFAULT_ENCODERS[modality]
        spec = EncoderSpec(spec.name, dict(spec.kwargs), spec.train)
        if spec.name in WORD_ENCODERS:
            vocab = self.vocabs.get(column) or WordVocab.build(texts, min_freq=1, max_size=20_000)
            self.vocabs[column] = vocab
            spec.kwargs["vocab_size"] = len(vocab)
        return spec

    # ------------------------------------------------------------------ features
    def _featurizer(self, column: str) -> Featurizer:
        if column not in self.featurizers:
            modality = self.schema[column].modality  # type: ignore[index]
            encoder = self.model.encoder(column)
            self.featurizers[column] = Featurizer(
                modality, encoder.preprocessing, self.vocabs.get(column), self.fit_config.augment
            )
        return self.featurizers[column]

    def _frozen_columns(self) -> list[str]:
        return [c for c in self.model.columns if self.model.encoder(c).frozen]

    @staticmethod
    def _column_values(manifest: Manifest, column: str) -> list:
        """``column``'s value in every row; None throughout when the manifest lacks the column
        (an optional input may be absent altogether)."""
        if column not in manifest.frame:
            return [None] * len(manifest)
        return manifest.frame[column].tolist()

    def _column_features(self, manifest: Manifest, column: str, progress: bool = True,
                         output: str = "pooled", dim: int | None = None):  # fmt: skip
        """``column``'s features for every row through the cache: ``(N, D)`` and presence
        ``(N,)`` (``output`` "grid": the flattened sequence, ``dim`` wide)."""
        encoder = self.model.encoder(column)
        feat = self._featurizer(column)

        def encode(values):
            return encode_items(encoder, feat, load_items(feat, values, manifest.root),
                                output=output)  # type: ignore[arg-type]  # fmt: skip

        values = self._column_values(manifest, column)
        return self.cache.features(
            encoder, feat.modality, values, manifest.root, encode,
            batch_size=self.fit_config.batch_size, progress=progress,
            **({} if output == "pooled" else {"kind": output, "dim": dim}),
        )  # fmt: skip

    def _cached_features(
        self, manifest: Manifest, progress: bool = True, columns: list[str] | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Pooled features of every frozen column (of ``columns``) for every row, through the
        cache."""
        return {
            column: self._column_features(manifest, column, progress)
            for column in self._frozen_columns()
            if columns is None or column in columns
        }

    @torch.no_grad()
    def _encoded(self, manifest: Manifest, column: str, progress: bool = False) -> torch.Tensor:
        """``column``'s pooled features for every row (zeros where missing): from the cache for a
        frozen encoder, else encoded in batches of ``fit_config.batch_size``."""
        encoder = self.model.encoder(column)
        if encoder.frozen:
            return self._column_features(manifest, column, progress)[0]
        feat = self._featurizer(column)
        values = self._column_values(manifest, column)
        size = self.fit_config.batch_size
        chunks = [encode_items(encoder, feat, load_items(feat, values[i : i + size], manifest.root))
                  for i in range(0, len(values), size)]  # fmt: skip
        return torch.cat(chunks) if chunks else torch.zeros(0, encoder.output_dim)

    def _loader(self, manifest: Manifest, cached, targets=None, train: bool = False,
                shuffle: bool = False, soft: torch.Tensor | None = None):  # fmt: skip
        """Batches of ``manifest``; ``soft``: (N, C) teacher logits, as ``batch["soft"]``; and
        whatever per-row tensors ``_row_tensors`` gives (a captioner's token ids)."""
        per_row = self._row_tensors(manifest)
        if soft is not None:
            per_row["soft"] = soft
        frozen = set(cached)
        featurizers = {c: self._featurizer(c) for c in self.model.columns}
        dataset = MultimodalDataset(manifest, featurizers, targets, train=train,
                                    seed=self.fit_config.seed, skip=frozen)  # fmt: skip

        def collate_fn(items):
            batch = collate(items, featurizers)
            index = batch["index"]
            batch["features"] = {c: feats[index] for c, (feats, _) in cached.items()}
            for c, (_, present) in cached.items():
                batch["mask"][c] = present[index]
            for key, values in per_row.items():
                batch[key] = values[index]
            return batch

        generator = torch.Generator().manual_seed(self.fit_config.seed)
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.fit_config.batch_size, shuffle=shuffle, collate_fn=collate_fn,
            num_workers=self.fit_config.num_workers, generator=generator,
        )  # fmt: skip

    # ------------------------------------------------------------------ fit
    def _split(self, manifest: Manifest) -> dict[str, Manifest]:
        frame = manifest.frame
        if "split" in frame and set(frame["split"].dropna().astype(str)) >= {"train", "val"}:
            split = frame["split"].astype(str).to_numpy()
        else:
            groups = frame["group"].astype(str).tolist() if "group" in frame else None
            strata = (  # classes (or a contrastive run's label, e.g. a category) stay balanced
                frame[self.label].astype(str).tolist()
                if self.label in frame and self._stratify
                else ["all"] * len(frame)
            )
            split = stratified_split(strata, seed=self.fit_config.seed, groups=groups)
        return {
            name: manifest.subset(np.flatnonzero(split == name))
            for name in ("train", "val", "test")
        }

    def fit(
        self,
        train: Data,
        val: Data | None = None,
        out_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        teacher: TaskPredictor | None = None,
    ) -> TaskPredictor:
        """Train on ``train``; validate on ``val``, or on the manifest's ``split`` column, or on a
        seeded stratified split. Writes checkpoints and logs under ``out_dir`` (a run folder).

        ``teacher``: a fitted classifier over the same labels; the model then also learns its
        soft targets (knowledge distillation: ``fit_config.optim.distill_alpha`` weighs them,
        ``distill_temperature`` softens both sides)."""
        import lightning as L

        L.seed_everything(self.fit_config.seed, workers=True, verbose=False)
        manifest = self._manifest(train)
        if self.label and self.label not in manifest.columns:
            raise ValueError(
                f"label column {self.label!r} not in the manifest (columns: {manifest.columns})"
            )
        self.schema = self._resolve_schema(manifest)
        manifest = self._clean(manifest, self.schema, progress)
        self._prepare_labels(manifest)
        parts = (
            self._split(manifest)
            if val is None
            else {"train": manifest, "val": self._clean(self._manifest(val), self.schema, progress)}
        )
        train_m, val_m = parts["train"], parts["val"]
        if len(train_m) == 0 or len(val_m) == 0:
            raise ValueError(
                f"need training and validation rows, got {len(train_m)} and {len(val_m)}"
            )
        self.test_manifest = parts.get("test")

        self._build(self._input_specs(train_m))
        self._mark_vocabularies()
        self.featurizers = {}
        soft = None
        if teacher is not None:
            soft = self._soft_targets(teacher, train_m, val_m, progress)
        return self._train(train_m, val_m, out_dir, resume, progress, soft)

    def _input_specs(self, train_m: Manifest) -> dict[str, EncoderSpec]:
        """Each input column's encoder (word vocabularies built on the training rows)."""
        inputs = {}
        for column in self.schema.inputs:  # type: ignore[union-attr]
            texts = (
                [str(v) for v in self._column_values(train_m, column.name) if not is_missing(v)]
                if column.modality is Modality.TEXT
                else []
            )
            inputs[column.name] = self._encoder_spec(column.name, column.modality, texts)
        return inputs

    def finetune(self, data: Data, out_dir: str | Path | None = None,
                 progress: bool = True) -> TaskPredictor:  # fmt: skip
        """Go on training the current model (``fit_config.epochs`` more at most, early stopping
        as in ``fit``) on the train/val rows of ``data``, split the way ``fit`` split them
        (the manifest's ``split`` column or the same seeded split), so no test row is trained
        on. For a pruned model with its masks still attached, the zeros stay zero."""
        self._require_model()
        manifest = self._clean(self._manifest(data), self.schema, progress)  # type: ignore[arg-type]
        parts = self._split(manifest)
        self.test_manifest = parts.get("test")
        return self._train(parts["train"], parts["val"], out_dir, False, progress, None)

    def _train(self, train_m: Manifest, val_m: Manifest, out_dir, resume: bool, progress: bool,
               soft: dict[str, torch.Tensor] | None) -> TaskPredictor:  # fmt: skip
        t0 = time.perf_counter()
        cached_train = self._cached_features(train_m, progress)
        cached_val = self._cached_features(val_m, progress)
        encode_seconds = time.perf_counter() - t0
        module = self._module(self._class_weights(train_m))
        run = (
            Path(out_dir)
            if out_dir is not None
            else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        )
        run.mkdir(parents=True, exist_ok=True)
        self.run_dir = run
        atomic_write_json(run / "config.json", self.describe(), default=str)
        monitor = self._monitor()
        mode = "max" if monitor in ("val_acc", "val_recall") else "min"
        train_loader = self._loader(train_m, cached_train, self._targets(train_m), train=True,
                                    shuffle=True, soft=soft and soft["train"])  # fmt: skip
        val_loader = self._loader(val_m, cached_val, self._targets(val_m),
                                  soft=soft and soft["val"])  # fmt: skip
        loop = fit_module(module, train_loader, val_loader, run, self.fit_config.loop(), monitor,
                          mode, resume, progress)  # fmt: skip
        self.model = module.model.cpu().eval()
        first = ("epochs_run", "resumed_from_epoch", "best_checkpoint", "best_score", "monitor")
        rows = {"train": len(train_m), "val": len(val_m), "test": len(self.test_manifest or [])}
        self.rank, self.processes = loop["rank"], loop["processes"]
        self.history = {
            **{k: loop[k] for k in first},
            "encode_seconds": round(encode_seconds, 3),
            "train_seconds": loop["train_seconds"],
            "cache": {ns: asdict(s) for ns, s in self.cache.stats.items()},
            "rows": rows,
        }
        if self.rank == 0:
            atomic_write_json(run / "history.json", self.history)
        return self

    def _mark_vocabularies(self) -> None:
        """A word-level encoder's features depend on its vocabulary, not only on its weights:
        the vocabulary's hash goes into the encoder id (and so into the feature cache key)."""
        for column, vocab in self.vocabs.items():
            encoder = self.model.encoder(column)
            digest = hashlib.sha256("\x00".join(vocab.itos).encode()).hexdigest()[:16]
            encoder.id_extras = {**(encoder.id_extras or {}), "vocab": digest}

    def describe(self) -> dict[str, Any]:
        """The resolved configuration (what a run saves next to its logs)."""
        return {
            "label": self.label,
            "task": self.task,
            "schema": self.schema.to_dict() if self.schema else None,
            "labels": self.labels,
            "model": self.config.to_dict() if self.config else None,
            "fit": asdict(self.fit_config),
        }

    # ------------------------------------------------------------------ predict / evaluate
    def _require_model(self):
        if self.model is None:
            raise RuntimeError("the predictor has no model yet: call fit() or load()")
        return self.model

    def predict_proba(self, *args, **kwargs):
        raise ValueError(self.instead_of_predict)

    def predict(self, *args, **kwargs):
        raise ValueError(self.instead_of_predict)

    def evaluation_rows(self, data: Data, split: str | None) -> Manifest:
        """The rows to score: those of ``split`` (if given), valid, with a label the model knows.
        Input columns the schema marks optional may be absent from the manifest (missing in every
        row)."""
        manifest = self._manifest(data)
        if split is not None:
            if "split" not in manifest.frame:
                raise ValueError(f"split={split!r} asked for, but the manifest has no split column")
            manifest = manifest.subset(np.flatnonzero(manifest.frame["split"].astype(str) == split))
        manifest = self._clean(manifest, self.schema, progress=False)  # type: ignore[arg-type]
        manifest = self._known_rows(manifest)
        if len(manifest) == 0:
            raise ValueError("no rows to evaluate")
        return manifest

    # ------------------------------------------------------------------ bundle
    def save(self, path: str | Path, metrics: dict[str, Any] | None = None,
             overwrite: bool = False):  # fmt: skip
        """Write a self-contained bundle (JSON + safetensors, no pickle) that ``load`` and
        ``modalforge serve`` read."""
        from modalforge.bundle import save_bundle

        model = self._require_model()
        config = self.config.to_dict()
        config["preprocessing"] = {c: model.encoder(c).preprocessing for c in model.columns}
        return save_bundle(
            path, task=self.task, schema=self.schema, label_column=self.label or None,  # type: ignore[arg-type]
            labels=self.labels, model_config=config, state_dict=model.state_dict(),
            metrics=metrics or {},
            extra={"fit": json.loads(json.dumps(asdict(self.fit_config), default=str)),
                   "history": self.history},
            assets=self._assets(), overwrite=overwrite,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path, cache_dir: str | Path | None = None,
             variant: str = "pytorch") -> TaskPredictor:  # fmt: skip
        """Rebuild a predictor from a bundle (weights verified by hash), whatever its task
        (``modalforge.tasks.load``). ``variant``: the trained weights (``pytorch``), or a
        PyTorch variant ``modalforge export`` added: other weights for the same model (format
        ``safetensors``, e.g. pruned) or a model of its own stored as a bundle inside the bundle
        (format ``bundle``, e.g. a distilled student). ONNX variants run through
        ``modalforge.runtime.Engine.from_bundle``."""
        from modalforge.tasks import load

        return load(path, variant=variant, cache_dir=cache_dir, kind=TaskPredictor)

    @classmethod
    def from_bundle(cls, bundle, variant: str = "pytorch", cache_dir=None,
                    device=None) -> TaskPredictor:  # fmt: skip
        """The predictor of a loaded ``bundle`` with its weights (``variant``: the pytorch weights
        or a ``safetensors`` variant), on the CPU (``device`` is the engine's business)."""
        config = {k: v for k, v in bundle.model_config.items() if k != "preprocessing"}
        predictor = cls.from_config(config, bundle.label_column, bundle.task, cache_dir)
        predictor.schema = bundle.schema
        predictor.labels = bundle.labels or None
        predictor._restore(bundle)
        fit = bundle.extra.get("fit") or {}
        if isinstance(fit.get("seed"), int):  # finetune() then splits the rows as fit() did
            predictor.fit_config.seed = fit["seed"]
        model = predictor._new_model()
        model.load_state_dict(bundle.state_dict(variant))
        predictor.model = model.eval()
        predictor._mark_vocabularies()
        if variant != "pytorch":  # other weights: other features, never the cached ones
            predictor.mark_weights(variant)
        predictor.bundle = bundle
        return predictor

    def mark_weights(self, tag: str) -> None:
        """Give every encoder an id of its own for weights changed after training (pruned,
        fine-tuned), so the feature cache never hands out features of the old weights."""
        for column in self._require_model().columns:
            encoder = self.model.encoder(column)
            encoder.id_extras = {**(encoder.id_extras or {}),
                                 "weights": f"{tag}:{weights_fingerprint(encoder)}"}  # fmt: skip


__all__ = ["DEFAULT_ENCODERS", "FitConfig", "TaskPredictor", "default_cache_dir"]
