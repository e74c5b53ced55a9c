"""A progress bar with no hard dependency: tqdm when importable, else a small in-place bar.

Both expose ``update(n)``, ``set_postfix_str(text)`` and ``close()``, and write to stderr, so a
program's stdout stays clean for its results.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class SimpleBar:
    """``desc [#######.....] 12/40 3.1it/s`` redrawn in place with a carriage return.

    Args:
        total: number of units the bar fills up to (> 0).
        desc: label in front of the bar.
        stream: where to draw (stderr by default).
        width: characters of the bar itself.
    """

    def __init__(self, total: int, desc: str = "", stream: TextIO | None = None,
                 width: int = 30):
        self.total, self.desc, self.width = max(int(total), 1), desc, width
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self.postfix = ""
        self._start = time.perf_counter()
        self._draw()

    def update(self, n: int = 1) -> None:
        self.n = min(self.n + int(n), self.total)
        self._draw()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        self._draw()

    def _draw(self) -> None:
        filled = self.width * self.n // self.total
        rate = self.n / max(time.perf_counter() - self._start, 1e-9)
        line = (f"\r{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.n}/{self.total} {rate:.1f}it/s")
        if self.postfix:
            line += f" {self.postfix}"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class NullBar:
    """The same interface doing nothing (``--no-progress``)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str = "", enabled: bool = True):
    """tqdm's bar if tqdm is installed, else :class:`SimpleBar`; :class:`NullBar` if disabled."""
    if not enabled:
        return NullBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return SimpleBar(total, desc)
    return tqdm(total=total, desc=desc, unit="tok", leave=True, file=sys.stderr)
