"""The stderr progress bar draws only on a terminal."""

from __future__ import annotations

import io

from edge_agent.evaluation.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_tty() -> None:
    stream = io.StringIO()
    with Progress(10, "embedding", stream=stream) as bar:
        bar.update(4)
        bar.update(6)
    assert stream.getvalue() == ""


def test_silent_when_disabled() -> None:
    stream = _Terminal()
    with Progress(3, "x", enabled=False, stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == ""


def test_draws_counts_on_a_terminal() -> None:
    stream = _Terminal()
    with Progress(4, "embedding", stream=stream, width=8, min_interval_s=0.0) as bar:
        bar.update(2)
        assert "embedding [####    ] 2/4" in stream.getvalue()
        bar.update(5)  # clamped to the total
    out = stream.getvalue()
    assert "[########] 4/4" in out
    assert out.endswith("\n")
