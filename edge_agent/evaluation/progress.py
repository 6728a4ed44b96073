"""A tiny progress bar on stderr for long offline runs; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """`with Progress(total, "embedding fan") as bar: bar.update(n)` draws `label [####  ] 12/40 3.1/s`.

    Disabled (draws nothing) when `enabled` is False or the stream is not a TTY, so logs and
    --json output stay clean in pipes and CI.
    """

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream: TextIO | None = None,
                 width: int = 30, min_interval_s: float = 0.1) -> None:
        self.total = max(0, int(total))
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and _is_tty(self.stream)
        self.width = width
        self.min_interval_s = min_interval_s
        self.done = 0
        self._started = time.monotonic()
        self._last_draw = 0.0

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        self._draw(force=self.done >= self.total)

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def render(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            filled = round(self.width * self.done / self.total)
            bar = "#" * filled + " " * (self.width - filled)
            return f"{self.label} [{bar}] {self.done}/{self.total} {rate:.1f}/s"
        return f"{self.label} {self.done} {rate:.1f}/s"

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        self.stream.write("\r" + self.render())
        self.stream.flush()


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
