"""What a task tells the serving engine: its inputs, how to predict a decoded batch, what
``/v1/models`` says about it -- the task half of LitServe's decode -> batch -> predict -> encode.

``runtime.Engine`` owns what every model shares (decoding request fields with the training
featurizers, batching, encoders run in tuned chunks, threads, warm-up); it builds the adapter
its task's registry entry names and calls it for the rest. An adapter reads the engine it
serves (``engine.model``, ``engine.features(samples)``, ``engine.predictor``) and never imports
the runtime or the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from modalforge.errors import RequestError
from modalforge.schema import Column, Modality

#: longest audio a request may carry (decoded length; the encoder reads at most its own window)
MAX_AUDIO_SECONDS = 120.0
#: the request field that carries a generating model's decoding options (set by the routes,
#: never by a client's fields: ``json_fields`` refuses unknown names before it is added)
OPTIONS = "__options__"


@dataclass
class Sample:
    """One decoded request: column -> preprocessed item (absent columns are missing)."""

    values: dict[str, Any]
    decode_seconds: float = 0.0
    options: dict[str, Any] | None = None  # a generating model's decoding options


class ServingAdapter:
    """Defaults for a ``TaskPredictor``-based task; subclasses override what differs."""

    #: ``decoding`` options a request may carry (None: the task takes none)
    options_type: type | None = None
    #: whether ``Engine.tune`` measures padding / chunk sizes for this task's encoders
    tunable: bool = True

    def __init__(self, engine, capabilities: frozenset[str]) -> None:
        self.engine = engine
        self.capabilities = capabilities

    @property
    def predictor(self):
        return self.engine.predictor

    # -- what the engine asks once ------------------------------------------------------------
    def inputs(self) -> list[Column]:
        """The request fields this model reads, in schema order."""
        columns = set(self.engine.model.columns)
        return [c for c in self.predictor.schema.inputs if c.name in columns]

    def featurizer(self, column: Column):
        """The training featurizer of ``column``; audio decodes whole clips (up to
        ``MAX_AUDIO_SECONDS``) instead of training's fixed-length ones."""
        feat = self.predictor._featurizer(column.name)
        if column.modality is Modality.AUDIO:
            feat.audio_cfg = type(feat.audio_cfg)(
                sample_rate=feat.audio_cfg.sample_rate,
                clip_seconds=None,
                max_decode_seconds=min(feat.audio_cfg.max_decode_seconds, MAX_AUDIO_SECONDS),
            )
        return feat

    def labels(self) -> list[str]:
        return list(self.predictor.labels or [])

    def encoders(self) -> dict[str, Any]:
        """Column -> EncoderSpec, for ``/v1/models``."""
        return dict(self.predictor.config.inputs)

    def card(self, base: dict[str, Any], serving: dict[str, Any]) -> dict[str, Any]:
        """What ``GET /v1/models`` says of this model: ``base`` (id, version, inputs, ...) and
        ``serving`` (device, tuning) with the task's own fields."""
        bundle = self.engine.bundle
        return {
            **base,
            "labels": self.engine.labels,
            "label_column": self.predictor.label,
            "schema": self.predictor.schema.to_dict(),
            "metrics": bundle.metrics if bundle is not None else {},
            "fusion": None,
            "encoders": {c: s.name for c, s in self.encoders().items()},
            "serving": serving,
            **self.card_extra(),
        }

    def card_extra(self) -> dict[str, Any]:
        return {}

    # -- per request / per batch --------------------------------------------------------------
    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse (RequestError) decoding options this task cannot take."""
        if self.options_type is None:
            raise RequestError(f"decoding options are for captioning models; this is a "
                               f"{self.engine.task} model", param="decoding")  # fmt: skip
        try:
            self.options_type(**options)
        except (TypeError, ValueError) as err:
            raise RequestError(f"decoding: {err}", param="decoding") from None

    def predict(self, samples: list) -> list[dict[str, Any]]:
        """A batch of decoded samples -> one result dict each (runs in the inference thread)."""
        raise NotImplementedError

    def outputs(self, samples: list) -> np.ndarray:
        """The raw numbers a parity gate compares between two runtimes of this model."""
        raise NotImplementedError(f"{self.engine.task} models have no parity outputs")


__all__ = ["MAX_AUDIO_SECONDS", "OPTIONS", "Sample", "ServingAdapter"]
