"""The model side of the server: decode -> batch -> predict -> encode, for one bundle.

``Engine.decode`` turns one request's fields into a ``Sample`` with the same ``Featurizer``
functions training used (so serving cannot drift from training) and raises ``RequestError`` (a
4xx) naming the field at fault; ``Engine.handle`` decodes and predicts a batch of requests in the
inference thread. ``Engine.predict``
runs a whole batch of samples in the inference thread: each encoder once on the rows that have
its modality, then the fusion head once on ``1 + M`` copies of the batch (all inputs, and each
input masked out) for the per-modality contributions.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalforge.data.errors import DecodeError
from modalforge.data.manifest import is_missing
from modalforge.schema import Column, Modality

#: longest audio a request may carry (decoded length; the encoder reads at most its own window)
MAX_AUDIO_SECONDS = 120.0
#: audio clips whose lengths differ by more than this factor are encoded in separate sub-batches
AUDIO_BUCKET_RATIO = 1.25


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx), a message naming the field and problem."""

    def __init__(
        self,
        message: str,
        status: int = 422,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.kind = kind


@dataclass
class Sample:
    """One decoded request: column -> preprocessed item (absent columns are missing)."""

    values: dict[str, Any]
    decode_seconds: float = 0.0
    options: dict[str, Any] | None = None  # a generating model's decoding options


#: the request field that carries a generating model's decoding options (set by the routes,
#: never by a client's fields: ``json_fields`` refuses unknown names before it is added)
OPTIONS = "__options__"


def _torch_threads(method):
    """Run ``method`` inside ``self._torch_threads()`` (see ``Engine.__init__``)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._torch_threads():
            return method(self, *args, **kwargs)

    return wrapper


class Engine:
    """A loaded bundle ready to serve. ``handle`` / ``predict`` may run in several inference
    threads at once (``--workers``): the model only reads its weights, and tokenizing -- a
    Hugging Face tokenizer refuses concurrent calls -- takes a lock."""

    def __init__(self, predictor, name: str | None = None, device: str | None = None,
                 model=None, variant: str = "pytorch") -> None:  # fmt: skip
        """``model``: what runs instead of ``predictor.model`` (an ``export.runtime.OrtModel``
        for an ONNX variant); ``variant``: its name, as the bundle lists it."""
        from modalforge.data.dataset import Featurizer

        self.predictor = predictor
        bundle = predictor.bundle
        self.name = name or _default_name(bundle.path if bundle is not None else None)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.variant = variant
        self.model = (model or predictor.model).to(self.device).eval()
        self.task: str = predictor.task
        self.labels: list[str] = list(predictor.labels or [])
        self.inputs: list[Column] = [
            c for c in predictor.schema.inputs if c.name in self.model.columns
        ]
        self.featurizers: dict[str, Featurizer] = {}
        #: most rows per encoder call, per column (``tune`` measures it; None: no cap)
        self.chunk_size: dict[str, int | None] = {c.name: None for c in self.inputs}
        self.tuning: dict[str, Any] = {}
        self._tokenizer_lock = threading.Lock()
        for column in self.inputs:
            feat = predictor._featurizer(column.name)
            if column.modality is Modality.AUDIO:
                feat.audio_cfg = type(feat.audio_cfg)(
                    sample_rate=feat.audio_cfg.sample_rate,
                    clip_seconds=None,
                    max_decode_seconds=min(feat.audio_cfg.max_decode_seconds, MAX_AUDIO_SECONDS),
                )
            self.featurizers[column.name] = feat
        files = bundle.files if bundle is not None else {}
        weights = [f for f in bundle.variants.get(variant, {}).get("files", [])
                   if f.endswith(".safetensors")] if bundle is not None else []  # fmt: skip
        digest = files.get(weights[0] if weights else "model.safetensors", {}).get("sha256", "")
        self.version = digest[:12] or "unsaved"
        self.created = int(time.time())
        self.bundle = bundle
        #: an ONNX variant's torch work is preprocessing and bookkeeping on small tensors: one
        #: torch thread for it, so torch's idle OpenMP worker neither spins beside ONNX Runtime's
        #: threads nor stalls a parallel region when the CPU is shared (demo bundle, onnx, batch
        #: 1, 2 cores beside a background job: 28-36 ms -> 14-17 ms per request)
        self._torch_threads = contextlib.nullcontext
        if model is not None:  # ONNX Runtime runs the graphs (pruned / distilled: PyTorch)
            from modalforge.export.runtime import single_torch_thread

            self._torch_threads = single_torch_thread

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        name: str | None = None,
        device: str | None = None,
        cache_dir: str | Path | None = None,
        variant: str = "pytorch",
    ) -> Engine:
        """Load a bundle; ``variant``: ``pytorch`` (the trained weights) or a variant the
        bundle lists (``modalforge export``): ONNX ones run with ONNX Runtime, pruned or
        distilled ones with PyTorch."""
        from modalforge.bundle import BundleError, load_bundle
        from modalforge.predictor import MultimodalPredictor

        found = load_bundle(path, verify=False)
        if found.task == "transcribe":
            from modalforge.transcribe import Transcriber

            if variant != "pytorch":
                raise BundleError(f"{path}: a speech-to-text bundle has no variant {variant!r}")
            return TranscriptionEngine(Transcriber.load(path, device), name)
        variants = found.variants
        if variant not in variants:
            raise BundleError(f"{path}: no variant {variant!r} (it has {sorted(variants)})")
        if variants[variant]["format"] in ("safetensors", "bundle"):
            predictor = MultimodalPredictor.load(path, cache_dir=cache_dir, variant=variant)
            return cls(predictor, name or _default_name(Path(path)), device, variant=variant)
        predictor = MultimodalPredictor.load(path, cache_dir=cache_dir)
        model = None
        if variant != "pytorch":
            from modalforge.export.runtime import OrtModel

            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if predictor.task == "caption":
                from modalforge.export.caption import OrtCaptioner

                model = OrtCaptioner(predictor.model, predictor.bundle.path, variants[variant], dev)
            else:
                model = OrtModel(predictor.model, predictor.bundle.path, variants[variant], dev)
        return cls(predictor, name, device, model=model, variant=variant)

    # -- describing ---------------------------------------------------------------------------
    def card(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says of this model (OpenAI's fields + ours)."""
        bundle = self.bundle
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "modalforge",
            "task": self.task,
            "version": self.version,
            "variant": self.variant,
            "inputs": [
                {"name": c.name, "type": c.modality.value, "required": c.required}
                for c in self.inputs
            ],
            "labels": self.labels,
            "label_column": self.predictor.label,
            "schema": self.predictor.schema.to_dict(),
            "metrics": bundle.metrics if bundle is not None else {},
            "fusion": self.predictor.fusion if self.task in ("classification", "regression")
            else None,
            "encoders": {c: s.name for c, s in _encoder_specs(self.predictor.config).items()},
            "serving": {"device": str(self.device), "tuning": self.tuning},
            **({"pairs": [f"{a}:{b}" for a, b in self.predictor.pairs],
                "embedding_dim": self.embedding_dim} if self.task == "contrastive" else {}),
            **({"decoder": self.predictor.config.decoder,
                "max_tokens": self.predictor.config.max_length - 1}
               if self.task == "caption" else {}),
        }  # fmt: skip

    @property
    def embedding_dim(self) -> int | None:
        """A contrastive bundle's embedding width (None for other tasks)."""
        config = self.predictor.config
        return getattr(config, "embed_dim", None) if self.task == "contrastive" else None

    # -- decode (per request, any thread) -----------------------------------------------------
    def decode(self, fields: Mapping[str, Any]) -> Sample:
        """Request fields (column -> bytes / str / number / dict) -> a Sample. Raises
        RequestError naming the field for unknown fields, missing required inputs and values
        that cannot be decoded."""
        t0 = time.perf_counter()
        options = fields.get(OPTIONS) or None
        fields = {k: v for k, v in fields.items() if k != OPTIONS}
        if options is not None:
            from modalforge.models.decoding import DecodeOptions

            if self.task != "caption":
                raise RequestError(f"decoding options are for captioning models; this is a "
                                   f"{self.task} model", param="decoding")  # fmt: skip
            try:
                DecodeOptions(**options)
            except (TypeError, ValueError) as err:
                raise RequestError(f"decoding: {err}", param="decoding") from None
        expected = {c.name for c in self.inputs}
        unknown = sorted(set(fields) - expected)
        if unknown:
            raise RequestError(
                f"unknown field(s) {unknown}; this model reads {sorted(expected)}", param=unknown[0]
            )
        values: dict[str, Any] = {}
        for column in self.inputs:
            value = fields.get(column.name)
            if value is not None and not _empty(value):
                values[column.name] = self._decode_value(column, value)
        for column in self.inputs:
            if column.required and column.name not in values:
                raise RequestError(
                    f"{column.name!r} ({column.modality.value}) is required by this model",
                    param=column.name,
                )
        if not values:
            raise RequestError(f"no inputs: give at least one of {sorted(expected)}")
        return Sample(values, time.perf_counter() - t0, options)

    def _decode_value(self, column: Column, value: Any) -> Any:
        m = column.modality
        if m in (Modality.IMAGE, Modality.AUDIO) and not isinstance(value, bytes | bytearray):
            raise RequestError(
                f"{column.name!r}: expected {m.value} file bytes, got {type(value).__name__}",
                param=column.name,
            )
        if m is Modality.TABULAR and isinstance(value, bool | bytes | bytearray | str):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise RequestError(
                    f"{column.name!r}: expected a number", param=column.name
                ) from None
        try:
            item = self.featurizers[column.name].load(value, None)
        except DecodeError as err:
            raise RequestError(f"{column.name!r}: {err}", param=column.name) from None
        except (ValueError, TypeError) as err:  # tabular / graph parsers
            raise RequestError(f"{column.name!r}: {err}", param=column.name) from None
        if m is Modality.TABULAR and not math.isfinite(item):
            raise RequestError(f"{column.name!r}: expected a finite number", param=column.name)
        return item

    # -- predict (a batch, the inference thread) ----------------------------------------------
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _chunks(self, column: Column, rows: list[int], samples: list[Sample]) -> list[list[int]]:
        """Rows to encode together: at most ``chunk_size[column]`` per call. Audio: sorted by
        length, cut where the padding would exceed ``AUDIO_BUCKET_RATIO`` (a batch pads every
        clip to its longest; a clip's features do not depend on its batch-mates, so this only
        saves compute)."""
        cap = self.chunk_size.get(column.name) or len(rows) or 1
        if column.modality is not Modality.AUDIO or len(rows) < 2:
            return [rows[i : i + cap] for i in range(0, len(rows), cap)]
        rows = sorted(rows, key=lambda i: len(samples[i].values[column.name]))
        chunks, current = [], [rows[0]]
        shortest = len(samples[rows[0]].values[column.name])
        for i in rows[1:]:
            length = len(samples[i].values[column.name])
            if length > AUDIO_BUCKET_RATIO * max(shortest, 1) or len(current) >= cap:
                chunks.append(current)
                current, shortest = [], length
            current.append(i)
        chunks.append(current)
        return chunks

    @torch.inference_mode()
    def features(
        self, samples: list[Sample]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Pooled features (B, D) and presence masks (B,) per column; zeros where missing."""
        n = len(samples)
        feats, mask = {}, {}
        for column in self.inputs:
            name = column.name
            encoder = self.model.encoder(name)
            present = [i for i, s in enumerate(samples) if name in s.values]
            out = torch.zeros(n, encoder.output_dim, device=self.device)
            for rows in self._chunks(column, present, samples) if present else []:
                items = [samples[i].values[name] for i in rows]
                if column.modality is Modality.TEXT:
                    with self._tokenizer_lock:
                        batch = self.featurizers[name].collate(items)
                else:
                    batch = self.featurizers[name].collate(items)
                out[rows] = encoder(self._to_device(batch)).pooled.float().to(out.device)
            m = torch.zeros(n, dtype=torch.bool, device=self.device)
            m[present] = True
            feats[name], mask[name] = out, m
        return feats, mask

    @_torch_threads
    def handle(
        self, requests: list[Mapping[str, Any]], on_decode: Callable[[float], None] | None = None
    ) -> list[dict[str, Any] | RequestError]:
        """Decode and predict a batch of requests' fields (the server's batch function, run in
        the inference thread): a request that cannot be decoded gets its RequestError, the
        others their result. ``on_decode(seconds)`` is called per decoded request (metrics).

        Decoding here rather than in a pool of threads is deliberate: on a small CPU, decode
        threads running beside torch's OpenMP threads stall its parallel regions (measured:
        the model ran 27 % slower per sample in the server than in-process; decoding in this
        thread, server throughput at 32 clients went from 0.78 to 0.98 of the in-process
        ceiling, see benchmarks/serve.py)."""
        out: list[Any] = [None] * len(requests)
        good, samples = [], []
        for i, fields in enumerate(requests):
            try:
                samples.append(self.decode(fields))
                good.append(i)
            except RequestError as err:
                out[i] = err
                continue
            if on_decode is not None:
                on_decode(samples[-1].decode_seconds)
        for i, result in zip(good, self.predict(samples) if samples else [], strict=True):
            out[i] = result
        return out

    @_torch_threads
    @torch.inference_mode()
    def logits(self, samples: list[Sample]) -> np.ndarray:
        """The head's raw outputs (B, C) with every given input (parity checks compare these;
        a contrastive model: every tower's embedding side by side, zeros where missing)."""
        feats, mask = self.features(samples)
        if self.task == "contrastive":
            return np.concatenate([
                (self.model.project(c, feats[c]) * mask[c][:, None]).float().cpu().numpy()
                for c in sorted(feats)
            ], axis=1)  # fmt: skip
        return self.model({}, mask, features=feats).outputs.float().cpu().numpy()

    @_torch_threads
    @torch.inference_mode()
    def predict(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """A batch of samples -> one result dict each (label, probabilities, contributions; a
        contrastive bundle: each given input's embedding)."""
        if self.task == "caption":
            return self._captions(samples)
        feats, mask = self.features(samples)
        if self.task == "contrastive":
            return self._embeddings(feats, mask)
        columns = [c.name for c in self.inputs]
        n, k = len(samples), 1 + len(columns)
        # copy 0: every input; copy j: input j masked out
        tiled = {c: f.repeat(k, 1) for c, f in feats.items()}
        tiled_mask = {}
        for j, c in enumerate(columns):
            m = mask[c].repeat(k)
            m[(j + 1) * n : (j + 2) * n] = False
            tiled_mask[c] = m
        out = self.model({}, tiled_mask, features=tiled)
        raw = out.outputs.float()
        values = raw.softmax(-1) if self.task == "classification" else raw
        values = values.cpu().numpy().reshape(k, n, -1)
        weights = None if out.weights is None else out.weights[:n].float().cpu().numpy()
        present = {c: mask[c].cpu().numpy() for c in columns}
        return [self._result(i, values, weights, present, columns) for i in range(n)]

    def _captions(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """Each image's caption: the encoder once over the batch (in tuned chunks), then the
        decoder per group of requests that asked for the same decoding."""
        from modalforge.models.decoding import DecodeOptions

        column = self.inputs[0]
        rows = list(range(len(samples)))
        memory = [None] * len(samples)
        for chunk in self._chunks(column, rows, samples):
            batch = self.featurizers[column.name].collate([samples[i].values[column.name]
                                                           for i in chunk])  # fmt: skip
            for i, m in zip(chunk, self.model.memory(inputs=self._to_device(batch)), strict=True):
                memory[i] = m
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(tuple(sorted((s.options or {}).items())), []).append(i)
        out: list[dict[str, Any]] = [{} for _ in samples]
        for key, members in groups.items():
            options = DecodeOptions(**{"max_length": self.predictor.config.max_length, **dict(key)})
            texts = self.predictor.captions_from_memory(torch.stack([memory[i] for i in members]),
                                                        options, model=self.model)  # fmt: skip
            for i, text in zip(members, texts, strict=True):
                out[i] = {"caption": text, "modalities": [column.name],
                          "decoding": {"method": options.method}}  # fmt: skip
        return out

    def _embeddings(self, feats, mask) -> list[dict[str, Any]]:
        """Unit-length embeddings of every given input (towers + projections)."""
        vectors = {c: self.model.project(c, f).float().cpu().numpy() for c, f in feats.items()}
        present = {c: m.cpu().numpy() for c, m in mask.items()}
        out = []
        for i in range(len(next(iter(present.values())))):
            used = [c for c in present if present[c][i]]
            out.append({"embeddings": {c: vectors[c][i].tolist() for c in used},
                        "modalities": used})  # fmt: skip
        return out

    def _result(self, i: int, values: np.ndarray, weights, present, columns) -> dict[str, Any]:
        used = [c for c in columns if present[c][i]]
        base = values[0, i]
        if self.task == "classification":
            pred = int(base.argmax())
            score = lambda v: float(v[pred])  # noqa: E731
            result: dict[str, Any] = {
                "label": self.labels[pred],
                "confidence": float(base[pred]),
                "probabilities": {
                    name: float(p) for name, p in zip(self.labels, base, strict=True)
                },
            }
        else:
            score = lambda v: float(v[0])  # noqa: E731
            result = {"prediction": float(base[0])}
        result["modalities"] = used
        # contribution: the prediction's score with every input minus without this one
        result["contributions"] = {
            c: round(score(base) - score(values[j + 1, i]), 6) if present[c][i] else None
            for j, c in enumerate(columns)
        }
        if weights is not None:
            result["fusion_weights"] = {
                c: round(float(w), 6) for c, w in zip(columns, weights[i], strict=True)
            }
        return result

    def warmup(self, max_batch: int = 32, tune: bool = True) -> None:
        """Pay one-off costs (lazy imports, allocator, kernels) before the first request, and
        with ``tune`` measure how to run this model's encoders on this machine."""
        sample = Sample({c.name: self.featurizers[c.name].placeholder() for c in self.inputs})
        for size in (1, 2):
            self.predict([sample] * size)
        if tune:
            self.tune(max_batch)

    @torch.inference_mode()
    def tune(self, max_batch: int = 32) -> dict[str, Any]:
        """Two measured choices, recorded in ``self.tuning``:

        * text with a Hugging Face tokenizer is padded to the batch's longest text instead of
          the bundle's fixed length when the two give the same pooled features (attention masks
          make them equal up to float rounding; checked here to 1e-4) -- short texts then cost
          a fraction of 64 tokens;
        * images are encoded in chunks of the size with the lowest time per image: on CPUs a
          large batch of depthwise convolutions can be slower per image than a small one.
        """
        for column in self.inputs:
            feat, encoder = self.featurizers[column.name], self.model.encoder(column.name)
            if (
                column.modality is Modality.TEXT
                and feat.preprocessing.get("tokenizer") != "word_vocab"
            ):
                self.tuning[column.name] = self._tune_padding(feat, encoder)
            elif column.modality is Modality.IMAGE and max_batch > 1:
                item = feat.placeholder()
                timings = {}
                size = 1
                while size <= max_batch:
                    batch = self._to_device(feat.collate([item] * size))
                    encoder(batch)  # warm this shape
                    runs = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        encoder(batch)
                        runs.append((time.perf_counter() - t0) / size)
                    timings[size] = min(runs)
                    size *= 2
                best = min(timings, key=timings.get)
                self.chunk_size[column.name] = best
                self.tuning[column.name] = {
                    "chunk_size": best,
                    "ms_per_image": {k: round(1000 * v, 3) for k, v in timings.items()},
                }
        return self.tuning

    def _tune_padding(self, feat, encoder) -> dict[str, Any]:
        from dataclasses import replace

        from modalforge.export.runtime import OrtEncoder

        # decided on the PyTorch encoder: an int8 graph's per-batch activation scales see the
        # padding, so it would always fail the check -- and its parity gate was measured with
        # the PyTorch encoder's choice
        if isinstance(encoder, OrtEncoder):
            encoder = encoder.encoder
        if feat.text_cfg.padding == "longest":
            return {"padding": "longest"}
        texts = ["a short one", "a somewhat longer sentence, with a comma and more words in it"]
        fixed = encoder(self._to_device(feat.collate(texts))).pooled
        original = feat.text_cfg
        feat.text_cfg = replace(original, padding="longest")
        longest = encoder(self._to_device(feat.collate(texts))).pooled
        diff = float((fixed - longest).abs().max())
        if not diff <= 1e-4:
            feat.text_cfg = original
        return {"padding": feat.text_cfg.padding, "max_abs_diff_vs_fixed": diff}


class TranscriptionEngine(Engine):
    """A speech-to-text bundle (``modalforge.transcribe.Transcriber``) served: one audio input,
    a transcript per request; requests batched like any model's."""

    def __init__(self, transcriber, name: str | None = None) -> None:
        from modalforge.data.dataset import Featurizer

        bundle = transcriber.bundle
        self.predictor = transcriber
        self.name = name or _default_name(bundle.path if bundle is not None else None)
        self.device = transcriber.device
        self.variant = "pytorch"
        self.model = transcriber.model
        self.task = "transcribe"
        self.labels = []
        self.inputs = list(bundle.schema.inputs)
        preprocessing = bundle.model_config.get("preprocessing", {})
        self.featurizers = {}
        for column in self.inputs:
            prep = dict(preprocessing.get(column.name, {}))
            prep["max_seconds"] = min(float(prep.get("max_seconds", 30.0)), MAX_AUDIO_SECONDS)
            prep["max_decode_seconds"] = prep["max_seconds"]
            self.featurizers[column.name] = Featurizer(Modality.AUDIO, prep)
        self.chunk_size = {c.name: None for c in self.inputs}
        self.tuning = {}
        self._tokenizer_lock = threading.Lock()
        self.version = bundle.files.get("model.safetensors", {}).get("sha256", "")[:12]
        self.created = int(time.time())
        self.bundle = bundle
        self._torch_threads = contextlib.nullcontext

    @property
    def embedding_dim(self) -> None:
        return None

    def card(self) -> dict[str, Any]:
        return {
            "id": self.name, "object": "model", "created": self.created,
            "owned_by": "modalforge", "task": self.task, "version": self.version,
            "variant": self.variant,
            "inputs": [{"name": c.name, "type": c.modality.value, "required": c.required}
                       for c in self.inputs],
            "schema": self.bundle.schema.to_dict(), "metrics": self.bundle.metrics,
            "serving": {"device": str(self.device), "tuning": self.tuning},
        }  # fmt: skip

    @torch.inference_mode()
    def predict(self, samples: list[Sample]) -> list[dict[str, Any]]:
        column = self.inputs[0].name
        texts = self.predictor.transcribe([s.values[column] for s in samples])
        return [{"text": text, "modalities": [column]} for text in texts]

    def tune(self, max_batch: int = 32) -> dict[str, Any]:
        return self.tuning


def _encoder_specs(config) -> dict[str, Any]:
    """Column -> EncoderSpec of a model config (a captioner has one image encoder)."""
    if hasattr(config, "inputs"):
        return dict(config.inputs)
    return {config.image: config.encoder}


def _empty(value: Any) -> bool:
    if isinstance(value, str):  # whitespace-only text is missing, as in a manifest
        return not value.strip()
    if isinstance(value, bytes | bytearray):
        return len(value) == 0
    try:
        return bool(is_missing(value))
    except (TypeError, ValueError):
        return False


def _default_name(path: Path | None) -> str:
    """The bundle folder's name; for ``RUN/bundle``, the run's name."""
    if path is None:
        return "model"
    path = Path(path).resolve()
    return path.parent.name if path.name == "bundle" and path.parent.name else path.name
