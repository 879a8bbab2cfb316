"""Moved: ``modalforge.experiments.sweep`` (issue 16: runs, sweeps, folds and ensembles sit above
the tasks, the training loop below them). This name is an alias of that module until
modalforge 0.3."""

import sys

from modalforge.experiments import sweep as _moved

sys.modules[__name__] = _moved
