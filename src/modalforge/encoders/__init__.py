"""Per-modality encoders, pretrained and from scratch, behind one registry."""

from modalforge.encoders.base import Encoder, EncoderOutput, masked_mean
from modalforge.encoders.registry import create_encoder, list_encoders, register_encoder

__all__ = [
    "Encoder",
    "EncoderOutput",
    "create_encoder",
    "list_encoders",
    "masked_mean",
    "register_encoder",
]
