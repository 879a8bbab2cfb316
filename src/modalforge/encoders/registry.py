"""One registry of encoders: ``create_encoder(name, **overrides)``, ``list_encoders()``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from modalforge.encoders.base import Encoder
from modalforge.schema import Modality


@dataclass(frozen=True)
class EncoderInfo:
    name: str
    modality: Modality
    description: str
    pretrained: bool
    factory: Callable[..., Encoder]
    #: overrides that make a tiny, fast instance for tests (hidden 32, 2 layers, ...)
    tiny: dict
    #: arguments of a typical full-size instance (what `modalforge models list` counts)
    reference: dict


_REGISTRY: dict[str, EncoderInfo] = {}


def register_encoder(
    name: str,
    modality: Modality | str,
    description: str,
    pretrained: bool = False,
    tiny: dict | None = None,
    reference: dict | None = None,
):
    def wrap(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} registered twice")
        _REGISTRY[name] = EncoderInfo(
            name, Modality(modality), description, pretrained, factory, dict(tiny or {}),
            dict(reference or {}),
        )  # fmt: skip
        return factory

    return wrap


#: the built-in implementations, imported by name on first use (like the task registry's
#: entries): they register themselves, and importing this module imports none of them
BUILTINS = (
    "modalforge.encoders.audio",
    "modalforge.encoders.graph",
    "modalforge.encoders.image",
    "modalforge.encoders.tabular",
    "modalforge.encoders.text",
)


def _load_builtins() -> None:
    for module in BUILTINS:
        importlib.import_module(module)


def list_encoders(modality: Modality | str | None = None) -> list[EncoderInfo]:
    _load_builtins()
    infos = sorted(_REGISTRY.values(), key=lambda i: (i.modality.value, i.name))
    return [i for i in infos if modality is None or i.modality is Modality(modality)]


def create_encoder(name: str, **overrides) -> Encoder:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r} (choose from {', '.join(sorted(_REGISTRY))})")
    encoder = _REGISTRY[name].factory(**overrides)
    encoder.name = name
    return encoder
