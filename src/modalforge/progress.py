"""A transient rich progress bar over a count of items, or nothing when disabled.

with progress_bar(len(rows), "transcribing", enabled) as advance:
    advance(8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class progress_bar:
    """A rich progress bar over ``total`` rows (transient), or nothing when disabled."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self.total, self.description, self.enabled = total, description, enabled
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if self.enabled:
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            task = self._bar.add_task(self.description, total=self.total)
            return lambda n: self._bar.advance(task, n)
        return lambda n: None

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


__all__ = ["progress_bar"]
