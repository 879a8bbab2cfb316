"""Run a model on inputs, with PyTorch or ONNX Runtime: ``Engine`` (decode -> batch -> predict
for any task), the ONNX runtime models of each task's variants, the one session builder.

Layering: ``runtime`` imports the tasks, never ``serve`` or ``export``; both of those run models
through it (a parity gate compares two engines).
"""

from modalforge.runtime.engine import Engine, Sample

__all__ = ["Engine", "Sample"]
