"""One registry of fusions: ``create_fusion(name, input_dims, output_dim, **overrides)``,
``list_fusions()``."""

from __future__ import annotations

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
    #: overrides that make a tiny, fast instance for tests (hidden 32, 1 layer, ...)
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


def _load_builtins() -> None:
    import modalforge.fusion.attention
    import modalforge.fusion.concat
    import modalforge.fusion.cross_attention
    import modalforge.fusion.early
    import modalforge.fusion.late
    import modalforge.fusion.lmf
    import modalforge.fusion.product
    import modalforge.fusion.tensor  # noqa: F401


def list_fusions() -> list[FusionInfo]:
    _load_builtins()
    return sorted(_REGISTRY.values(), key=lambda i: i.name)


def create_fusion(name: str, input_dims: dict[str, int], output_dim: int, **overrides) -> Fusion:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown fusion {name!r} (choose from {', '.join(sorted(_REGISTRY))})")
    fusion = _REGISTRY[name].factory(input_dims, output_dim, **overrides)
    fusion.name = name
    return fusion
