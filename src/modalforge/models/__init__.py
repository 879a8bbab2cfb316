"""Models assembled from parts: encoders per column, a fusion, a head."""

from modalforge.models.multimodal import (
    EncoderSpec,
    ModelConfig,
    ModelOutput,
    MultimodalModel,
    apply_training_mode,
    build_model,
)

__all__ = [
    "EncoderSpec",
    "ModelConfig",
    "ModelOutput",
    "MultimodalModel",
    "apply_training_mode",
    "build_model",
]
