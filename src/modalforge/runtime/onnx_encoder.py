"""Run a frozen encoder through ONNX Runtime: exported once, cached, checked against PyTorch.

``OnnxEncoder(encoder, example)`` exports ``encoder`` (frozen) to
``$MODALFORGE_CACHE/onnx/<encoder_id>.onnx`` unless that file is already there, compares its
outputs with PyTorch on ``example`` (max abs difference of the pooled features must stay within
``atol``, or the export is deleted and an error raised), then answers ``__call__(batch)`` with an
``EncoderOutput`` computed by ONNX Runtime, in a session from ``runtime.session`` (CUDA when torch
and the installed onnxruntime have it).

**A traceable core.** An encoder whose ``forward`` starts with work that cannot be traced (numpy
log-mel spectrograms, Python loops over clips) sets ``traceable_core`` and splits it:

* ``prepare(batch) -> dict[str, Tensor]``: the untraced preprocessing (it stays in Python, and
  ``OnnxEncoder`` calls it before every ONNX Runtime run);
* ``forward_features(features) -> EncoderOutput``: the traceable network, which is what gets
  exported, its inputs named by ``prepare``'s keys;
* optional ``feature_axes``: ``{key: axes that vary between calls}`` (default: every axis; axis
  0, the batch, is always dynamic);
* optional ``finish(output) -> EncoderOutput``: cheap untraced post-processing (cutting the
  sequence to the longest clip), applied to ONNX Runtime's outputs too;

so that ``forward(batch) == finish(forward_features(prepare(batch)))``. Such an encoder's graph
also returns its ``mask`` when ``with_sequence`` is set. Encoders without ``prepare`` are
exported whole, on their modality's batch keys (``INPUT_KEYS``).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modalforge.encoders.base import INPUT_KEYS, Encoder, EncoderOutput, weights_fingerprint
from modalforge.runtime.session import session

# which input axes vary between calls, per batch key
DYNAMIC_AXES = {
    "pixels": (0, 2, 3),
    "input_ids": (0, 1),
    "attention_mask": (0, 1),
    "waves": (0, 1),
    "wave_lengths": (0,),
    "values": (0,),
}


def quiet_exporter() -> None:
    """torch's ONNX exporter logs a warning per torchvision op it cannot register (we do not
    install torchvision): noise on every export."""
    import logging

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class ParityError(RuntimeError):
    """An exported graph whose outputs differ from PyTorch's beyond tolerance."""


#: weights above this many bytes go to a side file (``<graph>.data``): protobuf caps one
#: serialized message at 2 GiB, and the graph's structure needs room too
EXTERNAL_DATA_BYTES = 1_500_000_000


def graph_files(path: Path) -> list[Path]:
    """An ONNX file and the external-data files its initializers name (beside it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = []
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if location not in found:
                found.append(location)
    return [Path(path), *(Path(path).parent / name for name in found)]


def has_core(encoder: Encoder) -> bool:
    """Whether ``encoder`` splits its forward into ``prepare`` + a traceable
    ``forward_features`` (see the module docstring)."""
    return encoder.traceable_core


class _Flat(nn.Module):
    """Positional tensors in, (pooled[, sequence[, mask]]) out: the shape ONNX export wants."""

    def __init__(self, encoder: Encoder, keys: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.encoder, self.keys, self.outputs = encoder, keys, outputs
        self.core = has_core(encoder)

    def forward(self, *tensors: torch.Tensor):
        inputs = dict(zip(self.keys, tensors, strict=True))
        out = self.encoder.forward_features(inputs) if self.core else self.encoder(inputs)
        return tuple(getattr(out, name) for name in self.outputs)


def cache_root() -> Path:
    from modalforge.files import cache_dir

    return cache_dir() / "onnx"


class OnnxEncoder:
    def __init__(
        self,
        encoder: Encoder,
        example: dict[str, torch.Tensor],
        with_sequence: bool = False,
        atol: float = 1e-3,
        cache: Path | None = None,
    ) -> None:
        encoder.freeze()
        self.encoder = encoder
        self.core = has_core(encoder)
        self.with_sequence = with_sequence
        features = self._features(example)
        if self.core:
            self.keys = tuple(features)
        else:
            self.keys = tuple(k for k in INPUT_KEYS[encoder.modality] if k in example)
        with torch.no_grad():
            expected = self._torch(features)
        outputs = ["pooled"]
        if with_sequence:
            outputs.append("sequence")
            if self.core and expected.mask is not None:
                outputs.append("mask")
        self.outputs = tuple(outputs)
        suffix = "seq" if with_sequence else "pooled"
        if self.core:
            suffix = "core-" + "-".join(self.outputs)
        name = f"{encoder.encoder_id}-{weights_fingerprint(encoder)}-{suffix}.onnx"
        self.path = (cache or cache_root()) / name
        #: whether this instance exported the graph (False: it was in the cache) and how long
        #: the export took
        self.exported = not self.path.is_file()
        self.export_seconds = 0.0
        if self.exported:
            start = time.perf_counter()
            self._export(features)
            self.export_seconds = time.perf_counter() - start
        self.session = session(self.path)
        self.max_abs_diff = self._check(features, expected.pooled, atol)

    def _features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the graph takes: ``prepare(batch)`` for an encoder with a core, else the batch."""
        if self.core:
            with torch.no_grad():
                return dict(self.encoder.prepare(batch))
        return batch

    def _torch(self, features: dict[str, torch.Tensor]) -> EncoderOutput:
        if self.core:
            return self.encoder.forward_features(features)
        return self.encoder(features)

    def _dynamic_axes(self, key: str, tensor: torch.Tensor) -> tuple[int, ...]:
        if not self.core:
            return DYNAMIC_AXES[key]
        declared = self.encoder.feature_axes
        axes = tuple(declared.get(key, range(tensor.dim())))
        return axes if 0 in axes or tensor.dim() == 0 else (0, *axes)

    def _export(self, features: dict[str, torch.Tensor]) -> None:
        import shutil

        from modalforge.files import fsync_dir, remove_stale_temps, temp_name

        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path.parent)  # scratch folders of killed exports
        # written in a scratch folder under its final name (an external-data file is named
        # after the graph, and the graph refers to it by that name), then moved into place
        scratch = temp_name(self.path)
        scratch.mkdir()
        tmp = scratch / self.path.name
        size = sum(t.numel() * t.element_size() for t in self.encoder.state_dict().values())
        # Dim.AUTO: dynamic where the model allows it; torch.export works out which axes are
        # equal across inputs (the batch) and specializes the ones the model fixes
        quiet_exporter()
        auto = torch.export.Dim.AUTO
        shapes = tuple(
            {axis: auto for axis in self._dynamic_axes(k, features[k])} for k in self.keys
        )
        # the dynamo exporter: the legacy TorchScript one is deprecated and bakes in
        # size-dependent values such as TF "SAME" pads
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Flat(self.encoder, self.keys, self.outputs).eval(),
                tuple(features[k] for k in self.keys),
                input_names=list(self.keys),
                output_names=list(self.outputs),
                dynamic_shapes=(shapes,),
                dynamo=True,
                verbose=False,
            )
            program.save(str(tmp), external_data=size > EXTERNAL_DATA_BYTES)
        try:
            files = graph_files(tmp)
            for file in files:
                with file.open("rb") as f:
                    os.fsync(f.fileno())  # on disk before the rename makes it the real one
            for extra in files[1:]:  # the side files first: the graph is what marks "done"
                extra.replace(self.path.parent / extra.name)
            tmp.replace(self.path)
            fsync_dir(self.path.parent)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _check(self, features: dict[str, torch.Tensor], expected: torch.Tensor,
               atol: float) -> float:  # fmt: skip
        got = self._session_run(features)[0]
        diff = float(np.abs(got - expected.detach().cpu().numpy()).max())
        if not diff <= atol:
            for file in graph_files(self.path):
                file.unlink(missing_ok=True)
            raise ParityError(
                f"{self.encoder.name}: ONNX Runtime differs from PyTorch by {diff:.2e} "
                f"(tolerance {atol:.0e}); the export was discarded"
            )
        return diff

    def _session_run(self, features: dict[str, torch.Tensor]) -> list[np.ndarray]:
        feeds = {k: features[k].detach().cpu().numpy() for k in self.keys}
        return self.session.run(None, feeds)

    def run(self, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """The graph's outputs (``self.outputs``) for a batch (``prepare`` applied first)."""
        return self._session_run(self._features(batch))

    def __call__(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        outputs = dict(zip(self.outputs, (torch.from_numpy(o) for o in self.run(batch)),
                           strict=True))  # fmt: skip
        if self.core:
            out = EncoderOutput(pooled=outputs["pooled"], sequence=outputs.get("sequence"),
                                mask=outputs.get("mask"))  # fmt: skip
            return self.encoder.finish(out)
        mask = batch.get("attention_mask")
        return EncoderOutput(
            pooled=outputs["pooled"],
            sequence=outputs.get("sequence"),
            mask=None if mask is None else mask.bool(),
        )
