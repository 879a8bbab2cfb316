"""Moved: the generating routes are ``modalforge.serve.routes.generate`` (issue 16). This name
is an alias of that module until modalforge 0.3."""

import sys

from modalforge.serve.routes import generate as _moved

sys.modules[__name__] = _moved
