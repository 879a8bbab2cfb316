"""``ContrastivePredictor``: CLIP-style alignment of a manifest's columns, through the same data
pipeline, trainer and bundle as ``MultimodalPredictor``.

    p = ContrastivePredictor(pairs=[("image", "text"), ("audio", "text")], label="category")
    p.fit("data/emoji/manifest.csv")                 # frozen towers: features from the cache
    p.evaluate(p.test_manifest, zero_shot=["category"], out_dir="runs/clip/report")
    vectors, present = p.embed(manifest, "image")   # (N, D) unit-length, (N,) bool
    p.save("runs/clip/bundle")

``label`` is optional: it stratifies the split and names the default zero-shot column. Rows in
the same ``group`` (an emoji and its skin-tone variants) stay on one side of the split, so
retrieval is never measured on near-duplicates of training items.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modalforge.data.manifest import Manifest, is_missing
from modalforge.models import EncoderSpec
from modalforge.models.contrastive import ContrastiveConfig, build_contrastive
from modalforge.schema import Modality
from modalforge.tasks.base import FitConfig, TaskPredictor
from modalforge.tasks.serving import ServingAdapter
from modalforge.train.module import ContrastiveModule

#: zero-shot prompts, CLIP-style: the class name in a few sentences, embeddings averaged
DEFAULT_TEMPLATES = ("{}", "an emoji of {}", "a picture of {}", "an icon of {}")


def parse_pairs(values: str | list[str] | list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``"image:text,audio:text"`` (or a list of ``"a:b"`` / tuples) -> ``[("image", "text"),
    ...]``."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    pairs = []
    for value in values:
        parts = value.split(":") if isinstance(value, str) else list(value)
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(f"a pair is two columns as A:B, not {value!r}")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise ValueError("a contrastive task needs at least one pair of columns (A:B)")
    return pairs


class ContrastivePredictor(TaskPredictor):
    instead_of_predict = (
        "a contrastive model embeds, it does not predict a label: use embed(), "
        "`modalforge index build` + `modalforge search`, or /v1/embeddings"
    )

    def __init__(
        self,
        pairs: str | list[str] | list[tuple[str, str]],
        label: str | None = None,
        encoders: dict[str, EncoderSpec | str] | None = None,
        schema=None,
        embed_dim: int = 256,
        projection: str = "mlp",
        dropout: float = 0.0,
        fit_config: FitConfig | None = None,
        cache_dir: str | Path | None = None,
        on_bad_row: str = "skip",
    ) -> None:
        self.pairs = parse_pairs(pairs)
        columns = sorted({c for pair in self.pairs for c in pair})
        super().__init__(label=label or "", task="contrastive", encoders=encoders,
                         columns=columns, schema=schema, fit_config=fit_config,
                         cache_dir=cache_dir, on_bad_row=on_bad_row)  # fmt: skip
        if self.fit_config.monitor == "val_acc":  # no accuracy here: whole-set Recall@1
            self.fit_config.monitor = "val_recall"
        self.embed_dim = embed_dim
        self.projection = projection
        self.dropout = dropout

    @classmethod
    def from_config(
        cls, config: dict[str, Any], label: str | None = None, task: str = "contrastive",
        cache_dir=None,
    ) -> ContrastivePredictor:  # fmt: skip
        parsed = ContrastiveConfig.from_dict(config)
        predictor = cls(parsed.pairs, label=label, embed_dim=parsed.embed_dim,
                        projection=parsed.projection, dropout=parsed.dropout,
                        cache_dir=cache_dir)  # fmt: skip
        predictor.config = parsed
        return predictor

    # -- the parts of fit() that differ -----------------------------------------------------
    def _resolve_schema(self, manifest: Manifest):
        """Every tower's input is optional: a row trains the pairs it has, and an embedding is
        asked for one input at a time."""
        from dataclasses import replace

        from modalforge.schema import Schema

        schema = super()._resolve_schema(manifest)
        return Schema(tuple(replace(c, required=False) if c.name in self.columns else c
                            for c in schema.columns))  # fmt: skip

    def _build(self, inputs: dict[str, EncoderSpec]) -> None:
        self.config = ContrastiveConfig(
            inputs=inputs, pairs=self.pairs, embed_dim=self.embed_dim,
            projection=self.projection, dropout=self.dropout,
        )  # fmt: skip
        self.model = self._new_model()

    def _new_model(self):
        return build_contrastive(self.config)  # type: ignore[arg-type]

    def _module(self, class_weights):
        return ContrastiveModule(self.model, self.fit_config.optim)

    def _monitor(self) -> str:
        return self.fit_config.monitor

    # -- embeddings -------------------------------------------------------------------------
    @torch.no_grad()
    def embed(
        self, data, column: str, root=None, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unit-length embeddings ``(N, D)`` float32 of ``column`` for every row of ``data`` (a
        manifest, a DataFrame, or a list of values of that column) and ``(N,)`` presence (rows
        without the column get zeros)."""
        model = self._require_model()
        if column not in model.columns:
            raise ValueError(f"no tower for column {column!r} (towers: {model.columns})")
        if isinstance(data, list) and not (data and isinstance(data[0], dict)):
            data = pd.DataFrame({column: data})
        manifest = self._manifest(data, root)
        model.eval()
        present = np.array([not is_missing(v) for v in self._column_values(manifest, column)],
                           dtype=bool)  # fmt: skip
        pooled = self._encoded(manifest, column, progress)
        out = model.project(column, pooled.float()).numpy().astype(np.float32)
        out[~present] = 0.0
        return out, present

    def text_column(self) -> str | None:
        """The first text column with a tower (what zero-shot prompts go through)."""
        for column in self._require_model().columns:
            if self.schema is not None and self.schema[column].modality is Modality.TEXT:
                return column
        return None

    def zero_shot_classifier(self, classes: list[str], templates=DEFAULT_TEMPLATES) -> np.ndarray:
        """``(C, D)``: each class name in every template, embedded by the text tower, averaged
        and re-normalized (CLIP's prompt ensembling)."""
        text = self.text_column()
        if text is None:
            raise ValueError("zero-shot classification needs a text tower")
        prompts = [t.format(c) for c in classes for t in templates]
        vectors, _ = self.embed(prompts, text)
        mean = vectors.reshape(len(classes), len(templates), -1).mean(1)
        return mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(1e-12)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(
        self,
        data,
        split: str | None = None,
        out_dir: str | Path | None = None,
        ablation: bool = True,
        title: str | None = None,
        zero_shot: list[str] | None = None,
        templates=DEFAULT_TEMPLATES,
    ) -> dict[str, Any]:
        """Retrieval in both directions for every pair (Recall@1/5/10, median rank; the rows
        sharing a value with the query's row in either column are right answers too, so two
        emoji with one name both count), and zero-shot accuracy / macro-F1 on ``zero_shot``
        columns (default: the label) for every non-text tower. With ``out_dir``:
        ``report.md``, ``metrics.json`` and ``retrieval.png`` (queries and their top hits)."""
        from modalforge.evaluate.retrieval import retrieval_metrics

        manifest = self.evaluation_rows(data, split)
        frame = manifest.frame
        embedded = {c: self.embed(manifest, c) for c in self._require_model().columns}
        retrieval: dict[str, dict[str, Any]] = {}
        # the trained pairs, then every other pair of towers (audio -> image through a shared
        # text anchor: aligned without ever being paired)
        trained = [tuple(p) for p in self.pairs]
        others = [(a, b) for a, b in itertools.combinations(self._require_model().columns, 2)
                  if (a, b) not in trained and (b, a) not in trained]  # fmt: skip
        for a, b in [*trained, *others]:
            both = embedded[a][1] & embedded[b][1]
            if both.sum() < 2:
                continue
            rows = np.flatnonzero(both)
            ea, eb = embedded[a][0][rows], embedded[b][0][rows]
            scores = ea @ eb.T
            # j answers query i when it is the same item on either side: two emoji named
            # alike are both right for that name, and for each other's picture
            ka, kb = _keys(frame, a, rows), _keys(frame, b, rows)
            positives = (ka[:, None] == ka[None, :]) | (kb[:, None] == kb[None, :])
            retrieval[f"{a}→{b}"] = retrieval_metrics(scores, positives)
            retrieval[f"{b}→{a}"] = retrieval_metrics(scores.T, positives.T)
            for name in (f"{a}→{b}", f"{b}→{a}"):
                retrieval[name]["trained_pair"] = (a, b) in trained
        zero = {}
        columns = zero_shot if zero_shot is not None else ([self.label] if self.label else [])
        text = self.text_column()
        for target in columns:
            if target not in frame or text is None:
                continue
            classes = sorted({str(v) for v in frame[target] if not is_missing(v)})
            weights = self.zero_shot_classifier(classes, templates)
            for column in self._require_model().columns:
                if column == text:
                    continue
                vectors, present = embedded[column]
                known = present & frame[target].map(lambda v: not is_missing(v)).to_numpy()
                y = np.array([classes.index(str(v)) for v in frame[target][known]])
                pred = (vectors[known] @ weights.T).argmax(1)
                zero[f"{column}→{target}"] = _accuracy_f1(y, pred, len(classes))
        headline = {}
        for name, m in retrieval.items():
            headline[f"{name} R@1"] = m["recall@1"]
            headline[f"{name} R@5"] = m["recall@5"]
        for name, m in zero.items():
            headline[f"zero-shot {name} accuracy"] = m["accuracy"]
        result = {"rows": len(manifest), "retrieval": retrieval, "zero_shot": zero,
                  "headline": headline, "temperature": float(1 / self.model.scale.detach()),
                  "pairs": [f"{a}:{b}" for a, b in self.pairs]}  # fmt: skip
        if out_dir is not None:
            from modalforge.evaluate.retrieval_report import write_retrieval_report

            result["report"] = str(write_retrieval_report(out_dir, self, manifest, embedded,
                                                          result, title))  # fmt: skip
        return result


def _keys(frame: pd.DataFrame, column: str, rows: np.ndarray) -> np.ndarray:
    """What makes two rows the same item in ``column``: the cell's value, compared case- and
    space-insensitively."""
    values = frame[column].iloc[rows].tolist()
    return np.array([" ".join(str(v).lower().split()) for v in values], dtype=object)


def _accuracy_f1(y: np.ndarray, pred: np.ndarray, classes: int) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {"accuracy": float((y == pred).mean()) if len(y) else float("nan"),
            "f1_macro": float(f1_score(y, pred, average="macro", labels=list(range(classes)),
                                       zero_division=0)),
            "rows": len(y), "classes": classes,
            "chance": float(np.bincount(y, minlength=classes).max() / max(1, len(y)))}  # fmt: skip


def from_options(options, encoders, fit: FitConfig, schema) -> ContrastivePredictor:
    """``modalforge train --task contrastive``'s options -> a predictor."""
    return ContrastivePredictor(options.pairs or [], label=options.label, encoders=encoders,
                                schema=schema, embed_dim=options.embed_dim,
                                projection=options.projection,
                                dropout=options.projection_dropout, fit_config=fit,
                                cache_dir=options.cache_dir,
                                on_bad_row=options.on_bad_row)  # fmt: skip


class EmbeddingServing(ServingAdapter):
    """``/v1/embeddings`` and ``/v1/search``: each given input's unit-length embedding (its tower
    and projection)."""

    @property
    def embedding_dim(self) -> int:
        return int(self.predictor.config.embed_dim)

    def card_extra(self) -> dict[str, Any]:
        return {"pairs": [f"{a}:{b}" for a, b in self.predictor.pairs],
                "embedding_dim": self.embedding_dim}  # fmt: skip

    def embeddings(self, samples: list) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per tower: the embeddings ``(B, D)`` of every sample (zeros where the input is
        missing) and the presence ``(B,)``."""
        feats, mask = self.engine.features(samples)
        model = self.engine.model
        vectors = {c: (model.project(c, f) * mask[c][:, None]).float().cpu().numpy()
                   for c, f in feats.items()}  # fmt: skip
        return vectors, {c: m.cpu().numpy() for c, m in mask.items()}

    def outputs(self, samples: list) -> np.ndarray:
        """Every tower's embedding side by side (sorted columns), zeros where missing."""
        vectors, _ = self.embeddings(samples)
        return np.concatenate([vectors[c] for c in sorted(vectors)], axis=1)

    def predict(self, samples: list) -> list[dict[str, Any]]:
        vectors, present = self.embeddings(samples)
        out = []
        for i in range(len(samples)):
            used = [c for c in present if present[c][i]]
            out.append({"embeddings": {c: vectors[c][i].tolist() for c in used},
                        "modalities": used})  # fmt: skip
        return out
