"""Run a loaded bundle on requests: decode -> batch -> predict -> encode, for any task.

``Engine.decode`` turns one request's fields into a ``Sample`` with the same ``Featurizer``
functions training used (so serving cannot drift from training) and raises ``RequestError`` (a
4xx) naming the field at fault; ``Engine.handle`` decodes and predicts a batch of requests in the
inference thread. What a task answers comes from its serving adapter (``tasks.serving``, named
by the task registry); the engine owns what every task shares: decoding, encoders run once per
batch in tuned chunks, threads, warm-up. The model is the PyTorch one or, for an ONNX variant,
the task's runtime model (``runtime.onnx`` / ``runtime.caption``) behind the same surface.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalforge.data.errors import DecodeError
from modalforge.data.manifest import is_missing
from modalforge.encoders.features import encode_items
from modalforge.errors import RequestError
from modalforge.schema import Column, Modality
from modalforge.tasks.serving import MAX_AUDIO_SECONDS, OPTIONS, Sample

log = logging.getLogger("modalforge.serve")

#: audio clips whose lengths differ by more than this factor are encoded in separate sub-batches
AUDIO_BUCKET_RATIO = 1.25


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
                 model=None, variant: str = "pytorch", spec=None) -> None:  # fmt: skip
        """``model``: what runs instead of ``predictor.model`` (the task's ONNX runtime model
        for an ONNX variant); ``variant``: its name, as the bundle lists it; ``spec``: the task's
        registry entry (default: the predictor's)."""
        from modalforge.tasks import spec_for

        self.predictor = predictor
        bundle = predictor.bundle
        schema = bundle.schema if bundle is not None else None
        self.spec = spec or spec_for(predictor.task, getattr(predictor, "schema", None) or schema)
        self.name = name or _default_name(bundle.path if bundle is not None else None)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.variant = variant
        self.bundle = bundle
        self.model = (model or predictor.model).to(self.device).eval()
        self.task: str = predictor.task
        self.adapter = self.spec.resolve("serving")(self, self.spec.capabilities)
        self.labels: list[str] = self.adapter.labels()
        self.inputs: list[Column] = self.adapter.inputs()
        self.featurizers = {c.name: self.adapter.featurizer(c) for c in self.inputs}
        #: most rows per encoder call, per column (``tune`` measures it; None: no cap)
        self.chunk_size: dict[str, int | None] = {c.name: None for c in self.inputs}
        self.tuning: dict[str, Any] = {}
        self._tokenizer_lock = threading.Lock()
        files = bundle.files if bundle is not None else {}
        weights = [f for f in bundle.variants.get(variant, {}).get("files", [])
                   if f.endswith(".safetensors")] if bundle is not None else []  # fmt: skip
        digest = files.get(weights[0] if weights else "model.safetensors", {}).get("sha256", "")
        self.version = digest[:12] or "unsaved"
        self.created = int(time.time())
        #: an ONNX variant's torch work is preprocessing and bookkeeping on small tensors: one
        #: torch thread for it, so torch's idle OpenMP worker neither spins beside ONNX Runtime's
        #: threads nor stalls a parallel region when the CPU is shared (demo bundle, onnx, batch
        #: 1, 2 cores beside a background job: 28-36 ms -> 14-17 ms per request)
        self._torch_threads = contextlib.nullcontext
        if model is not None:  # ONNX Runtime runs the graphs (pruned / distilled: PyTorch)
            from modalforge.runtime.session import single_torch_thread

            self._torch_threads = single_torch_thread

    def limit_media(self, max_pixels: int | None = None, max_audio_seconds: float | None = None):
        """Serve-time limits on what a request's images and audio may be (``modalforge serve
        --max-image-pixels / --max-audio-seconds``): checked from the header, before decoding."""
        for feat in self.featurizers.values():
            if max_pixels is not None and getattr(feat, "image_cfg", None) is not None:
                feat.image_cfg = dataclasses.replace(feat.image_cfg, max_pixels=max_pixels)
            if max_audio_seconds is not None and getattr(feat, "audio_cfg", None) is not None:
                feat.audio_cfg = dataclasses.replace(
                    feat.audio_cfg, max_decode_seconds=max_audio_seconds
                )

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
        bundle lists (``modalforge export``): ONNX ones run with ONNX Runtime through the task's
        runtime model, pruned or distilled ones with PyTorch."""
        from modalforge.bundle import BundleError, load_bundle
        from modalforge.tasks import for_bundle, load

        found = load_bundle(path, verify=False)
        spec = for_bundle(found)
        variants = found.variants
        if variant not in variants:
            raise BundleError(f"{path}: no variant {variant!r} (it has {sorted(variants)})")
        if variants[variant]["format"] in ("safetensors", "bundle"):
            predictor = load(path, variant=variant, cache_dir=cache_dir, device=device)
            return cls(predictor, name or _default_name(Path(path)), device, variant=variant)
        predictor = load(path, cache_dir=cache_dir)
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        runtime_model = spec.resolve("onnx_model")
        model = runtime_model(predictor.model, predictor.bundle.path, variants[variant], dev)
        return cls(predictor, name, device, model=model, variant=variant, spec=spec)

    # -- describing ---------------------------------------------------------------------------
    def can(self, capability: str) -> bool:
        return self.spec.can(capability)

    def card(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says of this model (OpenAI's fields + ours)."""
        base = {
            "id": self.name, "object": "model", "created": self.created,
            "owned_by": "modalforge", "task": self.task, "version": self.version,
            "variant": self.variant,
            "inputs": [{"name": c.name, "type": c.modality.value, "required": c.required}
                       for c in self.inputs],
        }  # fmt: skip
        return self.adapter.card(base, {"device": str(self.device), "tuning": self.tuning})

    # -- decode (per request, any thread) -----------------------------------------------------
    def decode(self, fields: Mapping[str, Any]) -> Sample:
        """Request fields (column -> bytes / str / number / dict) -> a Sample. Raises
        RequestError naming the field for unknown fields, missing required inputs and values
        that cannot be decoded."""
        t0 = time.perf_counter()
        options = fields.get(OPTIONS) or None
        fields = {k: v for k, v in fields.items() if k != OPTIONS}
        if options is not None:
            self.adapter.check_options(options)
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
        except MemoryError:
            raise RequestError(f"{column.name!r}: too large to decode in this server's memory",
                               status=413, param=column.name) from None  # fmt: skip
        except Exception as err:  # a decoder's own failure on these bytes is still about them
            log.warning("modalforge: decoding %r failed: %r", column.name, err)
            raise RequestError(f"{column.name!r}: cannot be decoded ({type(err).__name__}: "
                               f"{err})", param=column.name) from None  # fmt: skip
        if m is Modality.TABULAR and not math.isfinite(item):
            raise RequestError(f"{column.name!r}: expected a finite number", param=column.name)
        return item

    # -- predict (a batch, the inference thread) ----------------------------------------------
    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def chunks(self, column: Column, rows: list[int], samples: list[Sample]) -> list[list[int]]:
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
            for rows in self.chunks(column, present, samples) if present else []:
                items = [samples[i].values[name] for i in rows]
                pooled = encode_items(encoder, self.featurizers[name], items, self.device,
                                      self._tokenizer_lock)  # fmt: skip
                out[rows] = pooled.float().to(out.device)
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
        for i, result in zip(good, self.predict_apart(samples) if samples else [], strict=True):
            out[i] = result
        return out

    def predict_apart(self, samples: list[Sample]) -> list[dict[str, Any] | Exception]:
        """``predict``, and when a batch raises, its halves on their own (recursively): only a
        sample that fails alone gets an error -- a RequestError (413 for running out of
        memory) or the exception itself (a server fault) -- and every other sample the
        result of a smaller batch, which is what it gets alone."""
        try:
            return self.predict(samples)
        except Exception as err:
            if len(samples) == 1:
                if isinstance(err, MemoryError):
                    return [RequestError("the model ran out of memory on this request's inputs",
                                         status=413)]  # fmt: skip
                return [err]
            log.warning("modalforge: a batch of %d failed (%r); predicting its halves apart",
                        len(samples), err)  # fmt: skip
            half = len(samples) // 2
            return self.predict_apart(samples[:half]) + self.predict_apart(samples[half:])

    @_torch_threads
    @torch.inference_mode()
    def outputs(self, samples: list[Sample]) -> np.ndarray:
        """The raw numbers a parity gate compares between two runtimes of this model: a
        classifier's head outputs (B, C); a contrastive model's embeddings of every tower side
        by side, zeros where missing."""
        return self.adapter.outputs(samples)

    @_torch_threads
    @torch.inference_mode()
    def predict(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """A batch of samples -> one result dict each (what the task's adapter answers: label,
        probabilities and contributions; embeddings; a caption; a transcript)."""
        return self.adapter.predict(samples)

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
        if not self.adapter.tunable:
            return self.tuning
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
                    batch = self.to_device(feat.collate([item] * size))
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

    def apply_tuning(self, tuning: Mapping[str, Any]) -> dict[str, Any]:
        """Take the choices ``tune`` made in another copy of this engine (another Ray Serve
        replica of the same bundle, on the same CPUs) instead of timing them again, so every copy
        runs alike: each image column's ``chunk_size``, each text column's ``padding``.
        ``tuning``: what that copy's ``tune`` returned. Raises ValueError for a column this
        model does not read. -> ``self.tuning`` (a copy of ``tuning``)."""
        unknown = sorted(set(tuning) - set(self.featurizers))
        if unknown:
            raise ValueError(f"tuning for column(s) {unknown}; this model reads "
                             f"{sorted(self.featurizers)}")  # fmt: skip
        for name, choice in tuning.items():
            if "chunk_size" in choice:
                self.chunk_size[name] = int(choice["chunk_size"])
            if "padding" in choice:
                feat = self.featurizers[name]
                feat.text_cfg = dataclasses.replace(feat.text_cfg, padding=choice["padding"])
        self.tuning = copy.deepcopy(dict(tuning))
        return self.tuning

    def _tune_padding(self, feat, encoder) -> dict[str, Any]:
        from dataclasses import replace

        from modalforge.runtime.onnx import OrtEncoder

        # decided on the PyTorch encoder: an int8 graph's per-batch activation scales see the
        # padding, so it would always fail the check -- and its parity gate was measured with
        # the PyTorch encoder's choice
        if isinstance(encoder, OrtEncoder):
            encoder = encoder.encoder
        if feat.text_cfg.padding == "longest":
            return {"padding": "longest"}
        texts = ["a short one", "a somewhat longer sentence, with a comma and more words in it"]
        fixed = encoder(self.to_device(feat.collate(texts))).pooled
        original = feat.text_cfg
        feat.text_cfg = replace(original, padding="longest")
        longest = encoder(self.to_device(feat.collate(texts))).pooled
        diff = float((fixed - longest).abs().max())
        if not diff <= 1e-4:
            feat.text_cfg = original
        return {"padding": feat.text_cfg.padding, "max_abs_diff_vs_fixed": diff}


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


__all__ = ["AUDIO_BUCKET_RATIO", "MAX_AUDIO_SECONDS", "OPTIONS", "Engine", "RequestError", "Sample"]
