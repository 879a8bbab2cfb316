"""Where modalforge keeps what it downloads or converts, and how it names a file's content.

One cache root for everything (``$MODALFORGE_CACHE``, default ``~/.cache/modalforge``): dataset
packages under ``npm/``, features under ``features/``, converted Whisper and LLM weights under
``whisper/`` and ``llm/``, ONNX encoders under ``onnx/``. A file is named, checked and recorded
by the sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MODALFORGE_CACHE`` or ``~/.cache/modalforge``, created if missing."""
    path = Path(os.environ.get("MODALFORGE_CACHE") or Path.home() / ".cache" / "modalforge")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


__all__ = ["cache_dir", "sha256_file"]
