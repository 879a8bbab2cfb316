"""modalforge: from a manifest of images, text and audio to a deployed multimodal model."""

__version__ = "0.1.0"
