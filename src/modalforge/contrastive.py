"""Moved: ``modalforge.tasks.contrastive`` (issue 16: one module per task). This name is an alias of
that module until modalforge 0.3."""

import sys

from modalforge.tasks import contrastive as _moved

sys.modules[__name__] = _moved
