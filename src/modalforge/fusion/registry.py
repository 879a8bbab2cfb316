"""One registry of fusions: ``create_fusion(name, input_dims, output_dim, **overrides)``,
``list_fusions()``."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from modalforge.fusion.base import Fusion


@dataclass(frozen=True)
class FusionInfo:
    name: str
    description: str
    #: True where the fusion emits the task outputs itself (late fusion), not a representation
    produces_outputs: bool
    factory: Callable[..., Fusion]
    #: overrides that make a tiny, fast instance for tests (width 32, 1 layer, ...)
    tiny: dict


_REGISTRY: dict[str, FusionInfo] = {}


def register_fusion(name: str, description: str, tiny: dict | None = None):
    def wrap(factory: type[Fusion]) -> type[Fusion]:
        if name in _REGISTRY:
            raise ValueError(f"fusion {name!r} registered twice")
        produces = bool(getattr(factory, "produces_outputs", False))
        _REGISTRY[name] = FusionInfo(name, description, produces, factory, dict(tiny or {}))
        return factory

    return wrap


#: the built-in implementations, imported by name on first use (like the task registry's
#: entries): they register themselves, and importing this module imports none of them
BUILTINS = (
    "modalforge.fusion.attention",
    "modalforge.fusion.concat",
    "modalforge.fusion.cross_attention",
    "modalforge.fusion.early",
    "modalforge.fusion.late",
    "modalforge.fusion.lmf",
    "modalforge.fusion.product",
    "modalforge.fusion.tensor",
)


def _load_builtins() -> None:
    for module in BUILTINS:
        importlib.import_module(module)


def list_fusions() -> list[FusionInfo]:
    _load_builtins()
    return sorted(_REGISTRY.values(), key=lambda i: i.name)


def create_fusion(name: str, input_dims: dict[str, int], output_dim: int, **overrides) -> Fusion:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown fusion {name!r} (choose from {', '.join(sorted(_REGISTRY))})")
    if "hidden" in overrides:
        warnings.warn("fusion argument 'hidden' is now 'width' (the fusion's inner width)",
                      FutureWarning, stacklevel=2)  # fmt: skip
        overrides = {("width" if k == "hidden" else k): v for k, v in overrides.items()}
    fusion = _REGISTRY[name].factory(input_dims, output_dim, **overrides)
    fusion.name = name
    return fusion
