"""Moved (issue 16): ``MultimodalPredictor`` is ``modalforge.tasks.classification``, the shared
pipeline ``modalforge.tasks.base``. These names stay importable from here until modalforge 0.3."""

from modalforge.tasks.base import (
    DEFAULT_ENCODERS,
    WORD_ENCODERS,
    FitConfig,
    TaskPredictor,
    default_cache_dir,
)
from modalforge.tasks.classification import MultimodalPredictor, guess_task
from modalforge.tasks.prediction import Prediction, accuracy_by, prediction_table

__all__ = [
    "DEFAULT_ENCODERS",
    "WORD_ENCODERS",
    "FitConfig",
    "MultimodalPredictor",
    "Prediction",
    "TaskPredictor",
    "accuracy_by",
    "default_cache_dir",
    "guess_task",
    "prediction_table",
]
