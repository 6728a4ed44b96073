"""Hysteresis and alert episodes: N over to raise, M under to clear, stable event ids, payloads."""

from __future__ import annotations

import uuid

import pytest

from edge_agent.agent.config import HysteresisConfig
from edge_agent.agent.episodes import EpisodeTracker
from edge_agent.agent.payloads import AlertContext, score_payload
from edge_agent.clock import iso_time


def _tracker(raise_after: int = 2, clear_after: int = 3, update_every: int = 100) -> EpisodeTracker:
    ctx = AlertContext(node="n", source="s", model="toy-abc", bank="b123", threshold=1.0)
    return EpisodeTracker(ctx, HysteresisConfig(raise_after, clear_after, update_every))


def _run(tracker: EpisodeTracker, scores: list[float]) -> list[tuple[int, dict]]:
    out = []
    for i, score in enumerate(scores):
        out += [(i, e) for e in tracker.observe(1_000_000.0 + i, score)]
    return out


def test_single_spikes_do_not_raise_and_n_consecutive_do() -> None:
    tracker = _tracker(raise_after=2)
    assert _run(tracker, [0.5, 2.0, 0.5, 2.0, 0.5]) == []
    events = _run(_tracker(raise_after=2), [0.5, 2.0, 3.0])
    assert [(i, e["type"]) for i, e in events] == [(2, "new")]
    new = events[0][1]
    assert new["start"] == iso_time(1_000_001.0)  # the first window over, not the raising one
    assert new["window_start"] == iso_time(1_000_002.0)
    assert new["top_score"] == 3.0 and new["score"] == 3.0 and new["seq"] == 0 and new["end"] is None
    uuid.UUID(new["event_id"])


def test_clears_only_after_m_consecutive_under_and_keeps_one_event_id() -> None:
    events = _run(_tracker(raise_after=1, clear_after=3), [2, 0, 0, 2, 0, 0, 0, 0])
    types = [(i, e["type"]) for i, e in events]
    assert types == [(0, "new"), (6, "end")]
    end = events[-1][1]
    assert end["event_id"] == events[0][1]["event_id"]
    assert end["end"] == iso_time(1_000_004.0)  # first window of the clearing run
    assert end["reason"] == "cleared" and end["windows_over"] == 2 and end["seq"] == 1


def test_updates_on_new_peaks_and_periodically() -> None:
    events = _run(_tracker(raise_after=1, clear_after=1, update_every=3), [2, 3, 2.5, 2.5, 2.5, 0])
    assert [e["type"] for _, e in events] == ["new", "update", "update", "end"]
    assert [e["seq"] for _, e in events] == [0, 1, 2, 3]
    assert events[1][1]["top_score"] == 3.0 and events[2][0] == 4


def test_second_episode_gets_a_new_event_id_and_close_ends_an_open_one() -> None:
    tracker = _tracker(raise_after=1, clear_after=1)
    first = _run(tracker, [2, 0])
    second = tracker.observe(2_000_000.0, 5.0)
    assert second[0]["event_id"] != first[0][1]["event_id"]
    closed = tracker.close(2_000_010.0, reason="stopped")
    assert closed[0]["type"] == "end" and closed[0]["reason"] == "stopped" and closed[0]["score"] is None
    assert tracker.close(2_000_011.0, reason="stopped") == []


def test_reconfigure_keeps_the_open_episode() -> None:
    tracker = _tracker(raise_after=1, clear_after=1)
    new = tracker.observe(0.0, 2.0)[0]
    ctx = AlertContext(node="n", source="s", model="toy-abc", bank="b999", threshold=10.0)
    tracker.reconfigure(ctx, HysteresisConfig(1, 1, 100))
    end = tracker.observe(1.0, 2.0)[0]  # 2.0 is under the new threshold
    assert end["type"] == "end" and end["event_id"] == new["event_id"] and end["threshold"] == 10.0


def test_score_payload_fields() -> None:
    ctx = AlertContext(node="n", source="s", model="m", bank="b", threshold=1.0)
    payload = score_payload(ctx, 0.0, 1.5, 12.3456, {"layer_1": 1.5})
    assert payload["over"] is True and payload["window_start"] == "1970-01-01T00:00:00.000Z"
    assert payload["latency_ms"] == pytest.approx(12.346) and payload["layers"] == {"layer_1": 1.5}
