"""Fusion of modality-keyed pooled features, behind one registry."""

from modalforge.fusion.base import Fusion, FusionOutput
from modalforge.fusion.dropout import modality_dropout
from modalforge.fusion.registry import FusionInfo, create_fusion, list_fusions, register_fusion

__all__ = [
    "Fusion",
    "FusionInfo",
    "FusionOutput",
    "create_fusion",
    "list_fusions",
    "modality_dropout",
    "register_fusion",
]
