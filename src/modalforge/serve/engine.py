"""Moved: the engine is ``modalforge.runtime.engine`` (issue 16: serving and export both run
models through ``runtime``). This name is an alias of that module until modalforge 0.3."""

import sys

from modalforge.runtime import engine as _moved

sys.modules[__name__] = _moved
