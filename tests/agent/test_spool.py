"""The on-disk spool: durable, ordered, bounded, tolerant of a torn tail."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.agent.spool import ACKS, COMPACT_AFTER, MESSAGES, Spool


def test_pending_survive_reopen_in_order_and_acks_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 100, 10**6)
    seqs = [spool.append(f"t/{i}", f'{{"i":{i}}}', 1).seq for i in range(5)]
    spool.ack(seqs[1])
    spool.close()
    again = Spool(tmp_path, 100, 10**6)
    assert [r.topic for r in again.pending()] == ["t/0", "t/2", "t/3", "t/4"]
    new = again.append("t/5", "{}", 1)
    assert new.seq > max(seqs)
    again.close()


def test_full_spool_drops_oldest_with_a_counted_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.agent.spool")
    spool = Spool(tmp_path, 3, 10**6)
    for i in range(5):
        spool.append("t", str(i), 1)
    assert [r.payload for r in spool.pending()] == ["2", "3", "4"]
    assert spool.dropped == 2
    assert sum("event=spool_full" in r.message for r in caplog.records) == 1, "one line per burst of drops"
    spool.ack(spool.pending()[0].seq)  # a delivery makes room: the burst is over, with its count
    assert " dropped=2 " in next(r.message for r in caplog.records if "spool_drops_ended" in r.message) + " "
    spool.append("t", "5", 1)
    spool.append("t", "6", 1)  # a new burst logs again
    assert sum("event=spool_full" in r.message for r in caplog.records) == 2 and spool.dropped == 3
    spool.close()
    by_bytes = Spool(tmp_path / "b", 1000, 2048)
    for i in range(10):
        by_bytes.append("t", "x" * 500 + str(i), 1)
    assert by_bytes.bytes <= 2048 and len(by_bytes) < 10 and by_bytes.dropped == 10 - len(by_bytes)
    assert by_bytes.pending()[-1].payload.endswith("9")


def test_torn_last_line_is_dropped_and_truncated(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 100, 10**6)
    spool.append("t", "a", 1)
    spool.append("t", "b", 1)
    spool.close()
    path = tmp_path / MESSAGES
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # power cut in the middle of the second line
    again = Spool(tmp_path, 100, 10**6)
    assert [r.payload for r in again.pending()] == ["a"] and again.recovered_torn == 1
    again.append("t", "c", 1)
    again.close()
    assert [r.payload for r in Spool(tmp_path, 100, 10**6).pending()] == ["a", "c"]


def test_corrupt_line_fails_its_crc(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 100, 10**6)
    spool.append("t", "abc", 1)
    spool.close()
    path = tmp_path / MESSAGES
    path.write_bytes(path.read_bytes().replace(b"abc", b"abd"))
    assert len(Spool(tmp_path, 100, 10**6)) == 0


def test_compaction_keeps_pending_and_resets_acks(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6, 10**9)
    keep = spool.append("keep", "k", 1)
    for _ in range(COMPACT_AFTER + 10):
        spool.ack(spool.append("t", "x", 1).seq)
    assert (tmp_path / ACKS).stat().st_size < 100
    assert (tmp_path / MESSAGES).read_text().count("\n") < 20
    spool.close()
    again = Spool(tmp_path, 10**6, 10**9)
    assert [r.seq for r in again.pending()] == [keep.seq]


def test_a_crash_at_any_byte_of_an_append_keeps_every_earlier_message(tmp_path: Path) -> None:
    """Power cut mid-write, simulated at every byte of the last line: the earlier messages load, the torn
    one is dropped, and the spool takes new messages after it (the reason to keep this file over SQLite)."""
    spool = Spool(tmp_path / "whole", 100, 10**6)
    for i in range(3):
        spool.append(f"t/{i}", f'{{"i":{i}}}', 1)
    spool.close()
    data = (tmp_path / "whole" / MESSAGES).read_bytes()
    last_line = data.rstrip(b"\n").rfind(b"\n") + 1
    for cut in range(last_line, len(data)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / MESSAGES).write_bytes(data[:cut])
        again = Spool(d, 100, 10**6)
        assert [r.topic for r in again.pending()] == ["t/0", "t/1"], cut
        again.append("t/new", "{}", 1)
        again.close()
        assert [r.topic for r in Spool(d, 100, 10**6).pending()] == ["t/0", "t/1", "t/new"], cut


def test_drops_are_counted_across_restarts_until_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2, 10**6)
    for i in range(5):
        spool.append(f"t/{i}", "{}", 1)
    assert spool.stats().dropped == 3 and spool.stats().unacknowledged_drops == 3
    spool.close()
    again = Spool(tmp_path, 2, 10**6)
    assert again.stats().dropped == 3 and again.stats().unacknowledged_drops == 3
    assert again.acknowledge_drops() == 3 and again.stats().unacknowledged_drops == 0
    again.close()
    final = Spool(tmp_path, 2, 10**6).stats()
    assert (final.pending, final.dropped, final.unacknowledged_drops, final.held) == (2, 3, 0, 0)
