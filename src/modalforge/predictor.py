"""``MultimodalPredictor``: the Python API; the CLI is a thin layer over it.

    predictor = MultimodalPredictor(label="category", fusion="attention")
    predictor.fit("data/emoji/manifest.csv")
    predictor.evaluate("data/emoji/manifest.csv", split="test")
    predictor.save("runs/emoji/bundle")
    MultimodalPredictor.load("runs/emoji/bundle").predict([{"image": "x.png", "text": "..."}])

Frozen encoders read their features from the on-disk cache (``data.cache``), so only the fusion
and head train over them; encoders that train see raw, augmented inputs every epoch.
"""

from __future__ import annotations

import contextlib
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
from modalforge.models import EncoderSpec, ModelConfig, MultimodalModel, build_model
from modalforge.schema import Modality, Schema
from modalforge.train.module import MultimodalModule, OptimConfig

# what reads each modality unless told otherwise
DEFAULT_ENCODERS: dict[Modality, EncoderSpec] = {
    Modality.IMAGE: EncoderSpec("efficientnet_lite0", {"image_size": 224}),
    Modality.TEXT: EncoderSpec("minilm"),
    Modality.AUDIO: EncoderSpec("whisper_tiny_en"),
    Modality.TABULAR: EncoderSpec("tabular_mlp", {"n_features": 1}),
}
WORD_ENCODERS = {"gru", "lstm", "bag_of_embeddings"}


def default_cache_dir() -> Path:
    from modalforge.data.catalog._common import cache_dir

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


@dataclass
class Prediction:
    probs: np.ndarray  # (N, C) probabilities (classification) or (N, 1) values
    weights: np.ndarray | None  # (N, M) fusion weights, if the fusion has them
    present: dict[str, np.ndarray]  # column -> (N,) bool


class MultimodalPredictor:
    def __init__(
        self,
        label: str,
        task: str | None = None,
        fusion: str = "concat",
        fusion_kwargs: dict[str, Any] | None = None,
        encoders: dict[str, EncoderSpec | str] | None = None,
        columns: list[str] | None = None,
        schema: Schema | None = None,
        hidden: int = 256,
        fit_config: FitConfig | None = None,
        cache_dir: str | Path | None = None,
        on_bad_row: str = "skip",
    ) -> None:
        self.label = label
        self.task = task
        self.fusion = fusion
        self.fusion_kwargs = dict(fusion_kwargs or {})
        # keys: a column name or a modality name ("image"); values: spec or encoder name
        self.encoder_overrides = {
            k: EncoderSpec(v) if isinstance(v, str) else v for k, v in (encoders or {}).items()
        }
        self.columns = columns
        self.declared_schema = schema
        self.hidden = hidden
        self.fit_config = fit_config or FitConfig()
        self.cache = FeatureCache(cache_dir or default_cache_dir())
        self.on_bad_row = on_bad_row
        # set by fit / load
        self.schema: Schema | None = None
        self.labels: list[str] | None = None
        self.config: ModelConfig | None = None
        self.model: MultimodalModel | None = None
        self.vocabs: dict[str, WordVocab] = {}
        self.featurizers: dict[str, Featurizer] = {}
        self.history: dict[str, Any] = {}
        self.run_dir: Path | None = None
        self.test_manifest: Manifest | None = None  # the held-out rows of the last fit
        self.bundle = None  # the Bundle a loaded predictor came from

    # ------------------------------------------------------------------ data in
    def _manifest(
        self, data: str | Path | Manifest | pd.DataFrame, root: str | Path | None = None
    ) -> Manifest:
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
            encoder = self.model.encoder(column)  # type: ignore[union-attr]
            self.featurizers[column] = Featurizer(
                modality, encoder.preprocessing, self.vocabs.get(column), self.fit_config.augment
            )
        return self.featurizers[column]

    def _frozen_columns(self) -> list[str]:
        return [c for c in self.model.columns if self.model.encoder(c).frozen]  # type: ignore[union-attr]

    def _cached_features(
        self, manifest: Manifest, progress: bool = True, columns: list[str] | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Pooled features of every frozen column (of ``columns``) for every row, through the
        cache."""
        out = {}
        for column in self._frozen_columns():
            if columns is not None and column not in columns:
                continue
            encoder = self.model.encoder(column)  # type: ignore[union-attr]
            feat = self._featurizer(column)

            def encode(values, feat=feat, encoder=encoder):
                batch = feat.collate([feat.load(v, manifest.root) for v in values])
                return encoder(batch).pooled

            values = (
                manifest.frame[column].tolist()
                if column in manifest.frame
                else [None] * len(manifest)
            )
            out[column] = self.cache.features(
                encoder, feat.modality, values, manifest.root, encode,
                batch_size=self.fit_config.batch_size, progress=progress,
            )  # fmt: skip
        return out

    def _loader(self, manifest: Manifest, cached, targets=None, train: bool = False,
                shuffle: bool = False, soft: torch.Tensor | None = None):  # fmt: skip
        """Batches of ``manifest``; ``soft``: (N, C) teacher logits, as ``batch["soft"]``; and
        whatever per-row tensors ``_row_tensors`` gives (a captioner's token ids)."""
        per_row = self._row_tensors(manifest)
        if soft is not None:
            per_row["soft"] = soft
        frozen = set(cached)
        featurizers = {c: self._featurizer(c) for c in self.model.columns}  # type: ignore[union-attr]
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

    def _row_tensors(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        """Per-row tensors (first dimension: the manifest's rows) that batches carry."""
        return {}

    # ------------------------------------------------------------------ fit
    def _targets(self, manifest: Manifest) -> list:
        values = manifest.frame[self.label].tolist()
        if self.task == "regression":
            return [float(v) for v in values]
        index = {c: i for i, c in enumerate(self.labels)}  # type: ignore[arg-type]
        return [index[str(v)] for v in values]

    def _split(self, manifest: Manifest) -> dict[str, Manifest]:
        frame = manifest.frame
        if "split" in frame and set(frame["split"].dropna().astype(str)) >= {"train", "val"}:
            split = frame["split"].astype(str).to_numpy()
        else:
            groups = frame["group"].astype(str).tolist() if "group" in frame else None
            strata = (  # classes (or a contrastive run's label, e.g. a category) stay balanced
                frame[self.label].astype(str).tolist()
                if self.label in frame and self.task not in ("regression", "caption")
                else ["all"] * len(frame)
            )
            split = stratified_split(strata, seed=self.fit_config.seed, groups=groups)
        return {
            name: manifest.subset(np.flatnonzero(split == name))
            for name in ("train", "val", "test")
        }

    def fit(
        self,
        train: str | Path | Manifest | pd.DataFrame,
        val: str | Path | Manifest | pd.DataFrame | None = None,
        out_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        teacher: MultimodalPredictor | None = None,
    ) -> MultimodalPredictor:
        """Train on ``train``; validate on ``val``, or on the manifest's ``split`` column, or on a
        seeded stratified split. Writes checkpoints and logs under ``out_dir`` (a run folder).

        ``teacher``: a fitted classifier over the same labels; the model then also learns its
        soft targets (knowledge distillation: ``fit_config.optim.distill_alpha`` weighs them,
        ``distill_temperature`` softens both sides)."""
        import lightning as L

        cfg = self.fit_config
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        manifest = self._manifest(train)
        if self.label and self.label not in manifest.columns:
            raise ValueError(
                f"label column {self.label!r} not in the manifest (columns: {manifest.columns})"
            )
        self.schema = self._resolve_schema(manifest)
        manifest = self._clean(manifest, self.schema, progress)
        if self.task is None:
            self.task = _guess_task(manifest.frame[self.label])
        if self.task == "classification":
            self.labels = sorted({str(v) for v in manifest.frame[self.label]})
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
            if self.task != "classification" or teacher.labels != self.labels:
                raise ValueError(
                    "distillation needs a classification teacher with the student's labels "
                    f"(teacher: {teacher.labels}, student: {self.labels})"
                )
            soft = {name: self._teacher_logits(teacher, part, progress)
                    for name, part in (("train", train_m), ("val", val_m))}  # fmt: skip
        return self._train(train_m, val_m, out_dir, resume, progress, soft)

    def _input_specs(self, train_m: Manifest) -> dict[str, EncoderSpec]:
        """Each input column's encoder (word vocabularies built on the training rows)."""
        inputs = {}
        for column in self.schema.inputs:  # type: ignore[union-attr]
            texts = (
                [str(v) for v in train_m.frame[column.name] if not is_missing(v)]
                if column.modality is Modality.TEXT
                else []
            )
            inputs[column.name] = self._encoder_spec(column.name, column.modality, texts)
        return inputs

    def _build(self, inputs: dict[str, EncoderSpec]) -> None:
        """``self.config`` and ``self.model`` for these input encoders."""
        num_outputs = len(self.labels) if self.task == "classification" else 1  # type: ignore[arg-type]
        self.config = ModelConfig(task=self.task, inputs=inputs, num_outputs=num_outputs,  # type: ignore[arg-type]
                                  fusion=self.fusion, fusion_kwargs=self.fusion_kwargs,
                                  hidden=self.hidden)  # fmt: skip
        self.model = self._new_model()

    def _new_model(self):
        """The architecture ``self.config`` describes, freshly initialized."""
        return build_model(self.config)  # type: ignore[arg-type]

    def _module(self, class_weights: torch.Tensor | None):
        """The LightningModule that trains ``self.model``."""
        return MultimodalModule(self.model, self.task, self.fit_config.optim, class_weights)  # type: ignore[arg-type]

    def _teacher_logits(
        self, teacher: MultimodalPredictor, manifest: Manifest, progress: bool
    ) -> torch.Tensor:
        """The teacher's log-probabilities for every row (as logits: softmax gives back its
        probabilities at any temperature)."""
        probs = teacher.predict_proba(manifest, progress=progress).probs
        return torch.from_numpy(np.log(np.clip(probs, 1e-12, None))).float()

    def finetune(
        self,
        data: str | Path | Manifest | pd.DataFrame,
        out_dir: str | Path | None = None,
        progress: bool = True,
    ) -> MultimodalPredictor:
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
               soft: dict[str, torch.Tensor] | None) -> MultimodalPredictor:  # fmt: skip
        import lightning as L

        cfg = self.fit_config
        num_outputs = len(self.labels) if self.task == "classification" else 1  # type: ignore[arg-type]
        t0 = time.perf_counter()
        cached_train = self._cached_features(train_m, progress)
        cached_val = self._cached_features(val_m, progress)
        encode_seconds = time.perf_counter() - t0
        class_weights = None
        if self.task == "classification" and cfg.class_weights == "balanced":
            counts = np.bincount(self._targets(train_m), minlength=num_outputs).astype(np.float64)
            class_weights = torch.tensor(
                counts.sum() / (num_outputs * np.maximum(counts, 1)), dtype=torch.float32
            )
        module = self._module(class_weights)

        run = (
            Path(out_dir)
            if out_dir is not None
            else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        )
        run.mkdir(parents=True, exist_ok=True)
        self.run_dir = run
        (run / "config.json").write_text(json.dumps(self.describe(), indent=2, default=str))
        monitor = cfg.monitor if self.task in ("classification", "contrastive") else "val_loss"
        mode = "max" if monitor in ("val_acc", "val_recall") else "min"
        callbacks = [
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=run / "checkpoints",
                filename="best",
                monitor=monitor,
                mode=mode,
            ),
            # Lightning's save_last only copies a checkpoint when the monitored one is saved; a
            # resume needs the true last epoch, so a second, unmonitored checkpoint keeps it
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=run / "checkpoints",
                filename="last",
                save_top_k=1,
                enable_version_counter=False,
            ),
            L.pytorch.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience),
        ]
        if progress:
            callbacks.append(L.pytorch.callbacks.RichProgressBar())
        loggers = [L.pytorch.loggers.CSVLogger(run, name="logs", version="")]
        with contextlib.suppress(ModuleNotFoundError):  # no tensorboard(X): CSV logs only
            loggers.append(L.pytorch.loggers.TensorBoardLogger(run, name="tensorboard", version=""))
        precision = cfg.precision or ("16-mixed" if torch.cuda.is_available() else "32-true")
        _quiet_lightning()
        trainer = L.Trainer(
            max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices,
            strategy=cfg.strategy, num_nodes=cfg.num_nodes, precision=precision,
            callbacks=callbacks, logger=loggers, enable_progress_bar=progress,
            enable_model_summary=False, deterministic="warn", log_every_n_steps=5,
            default_root_dir=run,
        )  # fmt: skip
        ckpt = run / "checkpoints" / "last.ckpt"
        resumed_from = None
        if resume and ckpt.is_file():
            # our own checkpoint, written by this run's Lightning trainer
            resumed_from = int(torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"])
        t0 = time.perf_counter()
        trainer.fit(
            module,
            self._loader(
                train_m,
                cached_train,
                self._targets(train_m),
                train=True,
                shuffle=True,
                soft=soft and soft["train"],
            ),
            self._loader(val_m, cached_val, self._targets(val_m), soft=soft and soft["val"]),
            ckpt_path=str(ckpt) if resumed_from is not None else None,
        )
        train_seconds = time.perf_counter() - t0
        best = callbacks[0].best_model_path
        if best:
            state = torch.load(best, map_location="cpu", weights_only=False)[
                "state_dict"
            ]  # our own checkpoint
            module.load_state_dict(state)
        self.model = module.model.cpu().eval()
        self.history = {
            "epochs_run": int(trainer.current_epoch),
            "resumed_from_epoch": resumed_from,
            "best_checkpoint": best,
            "best_score": None
            if callbacks[0].best_model_score is None
            else float(callbacks[0].best_model_score),
            "monitor": monitor,
            "encode_seconds": round(encode_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "cache": {ns: asdict(s) for ns, s in self.cache.stats.items()},
            "rows": {
                "train": len(train_m),
                "val": len(val_m),
                "test": len(self.test_manifest or []),
            },
        }
        (run / "history.json").write_text(json.dumps(self.history, indent=2))
        return self

    def _mark_vocabularies(self) -> None:
        """A word-level encoder's features depend on its vocabulary, not only on its weights:
        the vocabulary's hash goes into the encoder id (and so into the feature cache key)."""
        import hashlib

        for column, vocab in self.vocabs.items():
            encoder = self.model.encoder(column)  # type: ignore[union-attr]
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

    # ------------------------------------------------------------------ predict
    def _require_model(self) -> MultimodalModel:
        if self.model is None:
            raise RuntimeError("the predictor has no model yet: call fit() or load()")
        return self.model

    def predict_proba(
        self,
        data: str | Path | Manifest | pd.DataFrame | list[dict],
        root: str | Path | None = None,
        drop: set[str] = frozenset(),
        progress: bool = False,
        _cached=None,
    ) -> Prediction:
        """Class probabilities (N, C) for every row (regression: values (N, 1)). ``drop`` masks
        columns as missing (modality ablation)."""
        model = self._require_model()
        manifest = self._manifest(data, root)
        cached = _cached if _cached is not None else self._cached_features(manifest, progress)
        loader = self._loader(manifest, cached)
        probs, weights, present = [], [], {c: [] for c in model.columns}
        with torch.no_grad():
            for batch in loader:
                for c in drop:
                    batch["mask"][c] = torch.zeros_like(batch["mask"][c])
                out = model(batch["inputs"], batch["mask"], features=batch["features"])
                probs.append(
                    out.outputs.softmax(-1) if self.task == "classification" else out.outputs
                )
                if out.weights is not None:
                    weights.append(out.weights)
                for c in model.columns:
                    present[c].append(batch["mask"][c])
        return Prediction(
            probs=torch.cat(probs).numpy(),
            weights=torch.cat(weights).numpy() if weights else None,
            present={c: torch.cat(v).numpy() for c, v in present.items()},
        )

    def contributions(self, manifest: Manifest, base: Prediction, cached) -> dict[str, np.ndarray]:
        """Each column's contribution to each row's predicted class: p(pred | all inputs) -
        p(pred | that column removed). (N,) per column; 0 where the column was missing."""
        pred = base.probs.argmax(1)
        out = {}
        for column in self._require_model().columns:
            without = self.predict_proba(manifest, drop={column}, _cached=cached).probs
            delta = base.probs[np.arange(len(pred)), pred] - without[np.arange(len(pred)), pred]
            out[column] = np.where(base.present[column], delta, 0.0)
        return out

    def predict(
        self,
        data: str | Path | Manifest | pd.DataFrame | list[dict],
        root: str | Path | None = None,
    ) -> pd.DataFrame:
        """One row per input: the predicted label, each class's probability and each input
        column's contribution (classification); the predicted value (regression)."""
        manifest = self._manifest(data, root)
        cached = self._cached_features(manifest, progress=False)
        base = self.predict_proba(manifest, _cached=cached)
        table = prediction_table(base.probs, self.task, self.labels)  # type: ignore[arg-type]
        if self.task != "classification":
            return table
        for column, values in self.contributions(manifest, base, cached).items():
            table[f"contribution:{column}"] = values
        return table

    # ------------------------------------------------------------------ evaluate
    def evaluation_rows(
        self, data: str | Path | Manifest | pd.DataFrame, split: str | None
    ) -> Manifest:
        """The rows to score: those of ``split`` (if given), valid, with a label the model knows."""
        manifest = self._manifest(data)
        if split is not None:
            if "split" not in manifest.frame:
                raise ValueError(f"split={split!r} asked for, but the manifest has no split column")
            manifest = manifest.subset(np.flatnonzero(manifest.frame["split"].astype(str) == split))
        manifest = self._clean(manifest, self.schema, progress=False)  # type: ignore[arg-type]
        if self.task == "classification":
            known = manifest.frame[self.label].astype(str).isin(self.labels)  # type: ignore[arg-type]
            if not known.all():
                print(f"note: {int((~known).sum())} rows have labels the model never saw; left out")
                manifest = manifest.subset(np.flatnonzero(known.to_numpy()))
        if len(manifest) == 0:
            raise ValueError("no rows to evaluate")
        return manifest

    def evaluate(
        self,
        data: str | Path | Manifest | pd.DataFrame,
        split: str | None = None,
        out_dir: str | Path | None = None,
        ablation: bool = True,
        title: str | None = None,
        by: str | None = None,
    ) -> dict[str, Any]:
        """Metrics on ``data`` (only rows whose ``split`` column equals ``split``, if given), a
        modality-ablation table and the fusion's weights; with ``out_dir``, ``report.md`` +
        ``report.html`` + PNG plots. ``by``: a column (a VQA question type) whose groups get
        their own accuracy, beside answering each group's most common label. Returns the
        metrics as a JSON-safe dict."""
        from modalforge.evaluate import (
            classification_metrics,
            modality_ablation,
            regression_metrics,
            summarize_weights,
            write_report,
        )

        model = self._require_model()
        manifest = self.evaluation_rows(data, split)
        cached = self._cached_features(manifest, progress=False)
        warm = manifest.subset(range(min(8, len(manifest))))  # first calls pay one-off costs
        self.predict_proba(
            warm, _cached={c: (f[: len(warm)], p[: len(warm)]) for c, (f, p) in cached.items()}
        )
        t0 = time.perf_counter()
        base = self.predict_proba(manifest, _cached=cached)
        latency_ms = 1000 * (time.perf_counter() - t0) / len(manifest)
        y = np.asarray(self._targets(manifest))
        if self.task != "classification":
            metrics = regression_metrics(y, base.probs[:, 0])
            rows, weights = None, None
        else:
            metrics = classification_metrics(y, base.probs, self.labels)  # type: ignore[arg-type]
            rows = None
            if ablation and len(model.columns) > 1:
                rows = modality_ablation(
                    lambda drop: self.predict_proba(manifest, drop=drop, _cached=cached).probs,
                    y, list(model.columns),
                )  # fmt: skip
            weights = None
            if base.weights is not None:
                present = np.stack([base.present[c] for c in model.columns], axis=1)
                weights = summarize_weights(base.weights, list(model.columns), present)
        groups = None
        if by is not None and self.task == "classification":
            groups = accuracy_by(manifest.frame, by, y, base.probs.argmax(1), self.labels)  # type: ignore[arg-type]
        extra = {
            "rows": len(manifest),
            "fusion": self.fusion,
            "encoders": {c: s.name for c, s in self.config.inputs.items()},  # type: ignore[union-attr]
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable parameters (fusion + head + trained encoders)": sum(
                p.numel() for p in model.parameters() if p.requires_grad
            ),
            "latency per row, cached features (ms)": round(latency_ms, 4),
        }
        headline = metrics.headline()
        for key, g in (groups or {}).items():
            headline[f"accuracy {by}={key}"] = g["accuracy"]
        result = {
            "metrics": metrics.to_dict(),
            "headline": headline,
            **({"by": {"column": by, "groups": groups}} if groups else {}),
            "ablation": [r.to_dict() for r in rows] if rows else None,
            "weights": weights,
            **extra,
        }
        if out_dir is not None:
            tables = {f"Accuracy by {by}": [
                {by: k, "rows": g["rows"], "accuracy": g["accuracy"],
                 "majority answer": g["majority"], "its accuracy": g["majority_accuracy"]}
                for k, g in groups.items()]} if groups else None  # fmt: skip
            report = write_report(out_dir, title or f"modalforge: {self.label}", metrics,
                                  ablation=rows, weights=weights, extra=extra,
                                  tables=tables)  # fmt: skip
            result["report"] = str(report)
        return result

    # ------------------------------------------------------------------ bundle
    def save(
        self, path: str | Path, metrics: dict[str, Any] | None = None, overwrite: bool = False
    ):
        """Write a self-contained bundle (JSON + safetensors, no pickle) that ``load`` and
        ``modalforge serve`` read."""
        from modalforge.bundle import save_bundle

        model = self._require_model()
        config = self.config.to_dict()  # type: ignore[union-attr]
        config["preprocessing"] = {c: model.encoder(c).preprocessing for c in model.columns}
        return save_bundle(
            path,
            task=self.task,  # type: ignore[arg-type]
            schema=self.schema,  # type: ignore[arg-type]
            label_column=self.label or None,
            labels=self.labels if self.task == "classification" else None,
            model_config=config,
            state_dict=model.state_dict(),
            metrics=metrics or {},
            extra={"fit": json.loads(json.dumps(asdict(self.fit_config), default=str)),
                   "history": self.history},
            assets=self._assets(),
            overwrite=overwrite,
        )  # fmt: skip

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
    def load(
        cls, path: str | Path, cache_dir: str | Path | None = None, variant: str = "pytorch"
    ) -> MultimodalPredictor:
        """Rebuild a predictor from a bundle (weights verified by hash). ``variant``: the
        trained weights (``pytorch``), or a PyTorch variant ``modalforge export`` added: other
        weights for the same model (format ``safetensors``, e.g. pruned) or a model of its own
        stored as a bundle inside the bundle (format ``bundle``, e.g. a distilled student).
        ONNX variants run through ``Engine.from_bundle``."""
        from modalforge.bundle import BundleError, load_bundle

        bundle = load_bundle(path)
        if bundle.task == "transcribe":
            raise BundleError(f"{path}: a speech-to-text bundle: load it with "
                              "modalforge.transcribe.Transcriber.load")  # fmt: skip
        if variant != "pytorch":
            spec = bundle.variants.get(variant)
            if spec is None:
                known = sorted(bundle.variants)
                raise BundleError(f"{path}: no variant {variant!r} (it has {known})")
            if spec["format"] == "bundle":
                return cls.load(bundle.path / spec["folder"], cache_dir)
            if spec["format"] != "safetensors":
                raise BundleError(
                    f"{path}: variant {variant!r} is {spec['format']!r}, not PyTorch weights: "
                    "run it with Engine.from_bundle or modalforge serve --variant"
                )
        config_dict = {k: v for k, v in bundle.model_config.items() if k != "preprocessing"}
        if bundle.task == "contrastive":
            from modalforge.contrastive import ContrastivePredictor

            predictor: MultimodalPredictor = ContrastivePredictor.from_config(
                config_dict, label=bundle.label_column, cache_dir=cache_dir
            )
        elif bundle.task == "caption":
            from modalforge.caption import CaptionPredictor

            predictor = CaptionPredictor.from_config(config_dict, cache_dir=cache_dir)
        else:
            config = ModelConfig.from_dict(config_dict)
            predictor = cls(label=bundle.label_column or "", task=bundle.task,
                            fusion=config.fusion, fusion_kwargs=config.fusion_kwargs,
                            hidden=config.hidden, cache_dir=cache_dir)  # fmt: skip
            predictor.config = config
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
        from modalforge.encoders.onnx_runtime import weights_fingerprint

        for column in self._require_model().columns:
            encoder = self.model.encoder(column)  # type: ignore[union-attr]
            encoder.id_extras = {**(encoder.id_extras or {}),
                                 "weights": f"{tag}:{weights_fingerprint(encoder)}"}  # fmt: skip


def prediction_table(probs: np.ndarray, task: str, labels: list[str] | None) -> pd.DataFrame:
    """(N, C) probabilities -> label, confidence and ``p:<class>`` columns (classification);
    (N, 1) values -> a ``prediction`` column (regression)."""
    if task != "classification":
        return pd.DataFrame({"prediction": probs[:, 0]})
    table = pd.DataFrame({"label": [labels[i] for i in probs.argmax(1)]})  # type: ignore[index]
    table["confidence"] = probs.max(1)
    for i, name in enumerate(labels):  # type: ignore[arg-type]
        table[f"p:{name}"] = probs[:, i]
    return table


def _quiet_lightning() -> None:
    """Lightning's start-up chatter (accelerator lines, tips) and two warnings that do not apply:
    frozen encoders are meant to be in eval mode; the LeafSpec one is torch-internal."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def accuracy_by(frame: pd.DataFrame, column: str, y: np.ndarray, pred: np.ndarray,
                labels: list[str]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Accuracy per value of ``column``, beside the accuracy of always answering that group's
    most common label (counted on these rows: the strongest constant answer there is)."""
    if column not in frame:
        raise ValueError(f"evaluate by {column!r}: no such column (columns: {list(frame)})")
    keys = frame[column].astype(str).to_numpy()
    out = {}
    for key in sorted(set(keys)):
        rows = keys == key
        majority = int(np.bincount(y[rows]).argmax())
        out[key] = {"rows": int(rows.sum()), "accuracy": float((pred[rows] == y[rows]).mean()),
                    "majority": labels[majority],
                    "majority_accuracy": float((y[rows] == majority).mean())}  # fmt: skip
    return out


def _guess_task(values: pd.Series) -> str:
    """Regression for float columns with many distinct values, else classification."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and numeric.nunique() > 20 and not (numeric == numeric.round()).all():
        return "regression"
    return "classification"
