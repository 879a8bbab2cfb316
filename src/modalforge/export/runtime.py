"""Moved: ``modalforge.runtime.onnx`` (issue 16: ONNX Runtime lives in ``runtime``). This name is
an alias of that module until modalforge 0.3."""

import sys

from modalforge.runtime import onnx as _moved

sys.modules[__name__] = _moved
