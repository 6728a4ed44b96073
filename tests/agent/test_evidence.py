"""The evidence store (edge_agent/agent/evidence.py) on real files: FLAC written by libsndfile, read back
sample-exact; quota and eviction; labels; crash recovery; hostile files; a full disk (tmpfs, as root)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf  # type: ignore[import-untyped]

from edge_agent.agent.evidence import (
    MAX_CHUNK,
    MAX_WINDOWS,
    ClipWriter,
    EvidenceConfig,
    EvidenceNotFound,
    EvidenceStore,
)
from edge_agent.clock import iso_time

from .agent_helpers import tmpfs

RATE = 16000
T0 = 1.76e9 + 0.123  # epoch seconds of the stream's first sample
LOGGER = "edge_agent.agent.evidence"


def pcm_signal(seconds: float, seed: int = 0, amplitude: int = 3000) -> np.ndarray:
    """Noise as int16: FLAC cannot shrink it much, so sizes are predictable."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, amplitude, int(seconds * RATE))
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def window_starts(total: int, window: float, hop: float) -> list[int]:
    """Sample offsets of the windows over a stream of `total` samples."""
    w, h = round(window * RATE), round(hop * RATE)
    return [k * h for k in range((total - w) // h + 1)]


def feed(writer: ClipWriter, pcm: np.ndarray, window: float, hop: float, skip: frozenset[int] = frozenset(),
         embeddings: bool = False) -> list[int]:
    """Feed the windows of `pcm` (float32 = int16 / 32768, start times T0 + k*hop) except those in `skip`;
    returns the indices fed."""
    w = round(window * RATE)
    fed = []
    for k, offset in enumerate(window_starts(pcm.size, window, hop)):
        if k in skip:
            continue
        samples = pcm[offset:offset + w].astype(np.float32) / 32768.0
        embs = [{"emb": np.full(4, k, np.float32)}] if embeddings else None
        writer.add_window(T0 + k * hop, samples, RATE, score=float(k), embeddings=embs, in_episode=k > 1)
        fed.append(k)
    return fed


def read_flac(path: Path) -> np.ndarray:
    data, rate = sf.read(str(path), dtype="int16")
    assert rate == RATE
    return np.asarray(data)


def new_id() -> str:
    return str(uuid.uuid4())


def make_store(directory: Path, **cfg: Any) -> EvidenceStore:
    return EvidenceStore(directory, EvidenceConfig(**cfg), node="node-1")


def record(store: EvidenceStore, seconds: float, seed: int = 0, window: float = 5.0,
           hop: float = 5.0, event_id: str | None = None) -> str:
    event_id = event_id or new_id()
    writer = store.open_clip(event_id, "fan", RATE, {"model": "mn04", "threshold": 1.5})
    feed(writer, pcm_signal(seconds, seed), window, hop)
    assert writer.finish(T0 + seconds, "cleared") is not None, writer.error
    return event_id


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


@pytest.fixture
def store(tmp_path: Path) -> EvidenceStore:
    return make_store(tmp_path / "evidence")


# -- audio -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "hop"), [(10.0, 5.0), (10.0, 10.0), (10.0, 2.5), (1.0, 0.37)])
def test_windows_become_the_stream_sample_exact(store: EvidenceStore, window: float, hop: float) -> None:
    pcm = pcm_signal(61.3, seed=1)
    event_id = new_id()
    writer = store.open_clip(event_id, "fan", RATE, {"model": "mn04"})
    assert store.usage()["open"] == 1
    fed = feed(writer, pcm, window, hop)
    covered = window_starts(pcm.size, window, hop)[-1] + round(window * RATE)
    assert writer.seconds == covered / RATE
    ref = writer.finish(T0 + 70, "cleared")
    assert ref is not None and not writer.failed

    info = store.get(event_id)
    assert info is not None
    audio = read_flac(info.audio_path)
    assert np.array_equal(audio, pcm[:covered])
    assert sf.info(str(info.audio_path)).subtype == "PCM_16"
    assert hashlib.sha256(info.audio_path.read_bytes()).hexdigest() == ref.sha256 == info.sha256
    assert ref.as_dict() == {"id": event_id, "duration": covered / RATE, "bytes": info.audio_path.stat().st_size,
                             "sha256": ref.sha256, "format": "flac", "sample_rate": RATE, "start": iso_time(T0),
                             "end": iso_time(T0 + 70), "truncated": False}
    meta = json.loads(info.meta_path.read_text())
    assert meta["gaps"] == [] and meta["frames"] == covered and meta["windows"] == len(fed)
    assert meta["node"] == "node-1" and meta["source"] == "fan" and meta["context"] == {"model": "mn04"}
    assert meta["interrupted"] is False and meta["reason"] == "cleared"
    assert not list(info.audio_path.parent.glob("*.partial.flac"))
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in (info.audio_path, info.windows_path, info.meta_path)} == {0o640}
    assert store.usage() == {"clips": 1, "bytes": info.bytes, "max_bytes": 500_000_000, "open": 0, "labelled": 0,
                             "evicted": 0, "write_errors": 0}


def test_start_times_at_any_sample_offset_round_to_the_nearest_sample(store: EvidenceStore) -> None:
    rate, window, hop = 22050, 22050, 7919  # a hop that is no round number of seconds
    rng = np.random.default_rng(15)
    pcm = np.clip(rng.normal(0, 8000, 20 * rate), -32768, 32767).astype(np.int16)
    pcm[:50] = [-32768, 32767] * 25  # full scale both ways survives the float round trip
    writer = store.open_clip(new_id(), "fan", rate, {})
    offsets = range(0, pcm.size - window + 1, hop)
    for offset in offsets:
        writer.add_window(T0 + offset / rate, pcm[offset:offset + window].astype(np.float32) / 32768.0, rate, 1.0,
                          None, True)
    ref = writer.finish(None, "cleared")
    assert ref is not None
    data, got_rate = sf.read(str(store.directory / f"{ref.event_id}.flac"), dtype="int16")
    assert got_rate == rate and np.array_equal(data, pcm[:offsets[-1] + window])
    assert store.get(ref.event_id).meta["gaps"] == []  # type: ignore[union-attr]


def test_a_window_at_another_rate_keeps_its_embeddings_not_its_audio(store: EvidenceStore) -> None:
    pcm = pcm_signal(20, seed=16)
    writer = store.open_clip(new_id(), "fan", RATE, {})
    writer.add_window(T0, pcm[:10 * RATE] / 32768.0, RATE, 1.0, [{"emb": np.ones(3)}], True)
    writer.add_window(T0 + 10, np.zeros(10 * 8000, np.float32), 8000, 2.0, [{"emb": np.zeros(3)}], True)
    ref = writer.finish(T0 + 20, "cleared")
    assert ref is not None and ref.duration == 10.0
    assert store.windows(ref.event_id).members[0]["emb"].tolist() == [[1, 1, 1], [0, 0, 0]]


def test_embeddings_are_kept_for_at_most_max_windows(store: EvidenceStore) -> None:
    rate = 1000
    writer = store.open_clip(new_id(), "fan", rate, {})
    samples = np.zeros(100, np.float32)
    samples[::7] = 0.25
    for k in range(MAX_WINDOWS + 5):
        writer.add_window(T0 + k * 0.1, samples, rate, 1.0, [{"emb": np.full(2, k, np.float32)}], True)
    ref = writer.finish(None, "cleared")
    assert ref is not None and ref.truncated and ref.duration == 300.0  # the default max_clip_seconds
    windows = store.windows(ref.event_id)
    assert windows.start.size == MAX_WINDOWS and windows.members[0]["emb"][-1, 0] == MAX_WINDOWS - 1
    assert store.get(ref.event_id).meta["windows_dropped"] == 5  # type: ignore[union-attr]


def test_a_gap_is_recorded_not_padded_and_late_windows_are_ignored(store: EvidenceStore) -> None:
    pcm = pcm_signal(60, seed=2)
    event_id = new_id()
    writer = store.open_clip(event_id, "fan", RATE, {})
    # window 10 s, hop 5 s; windows 4, 5 and 6 (starting 20, 25, 30 s) never arrive: audio 0..25 s, 35..60 s
    feed(writer, pcm, 10.0, 5.0, skip=frozenset({4, 5, 6}))
    writer.add_window(T0 + 5.0, pcm[5 * RATE:15 * RATE] / 32768.0, RATE, 0.5, None, False)  # late: ignored
    writer.add_window(T0 + 50.0, pcm[50 * RATE:60 * RATE] / 32768.0, RATE, 0.5, None, True)  # inside: ignored
    assert writer.finish(None, "stopped") is not None

    info = store.get(event_id)
    assert info is not None
    expected = np.concatenate([pcm[:25 * RATE], pcm[35 * RATE:]])
    assert np.array_equal(read_flac(info.audio_path), expected)
    assert info.meta["gaps"] == [{"at": iso_time(T0 + 25.0), "at_epoch": T0 + 25.0, "seconds": 10.0}]
    assert info.duration == 50.0 and info.meta["audio_end_epoch"] == T0 + 60.0
    assert info.meta["windows"] == 10 and info.ref().end is None
    assert store.windows(event_id).start.size == 10  # the late windows' embeddings are kept all the same


def test_audio_is_capped_at_max_clip_seconds_and_windows_still_kept(tmp_path: Path) -> None:
    store = make_store(tmp_path / "ev", max_clip_seconds=12.0)
    pcm = pcm_signal(40, seed=3)
    writer = store.open_clip(new_id(), "fan", RATE, {})
    fed = feed(writer, pcm, 10.0, 5.0, embeddings=True)
    ref = writer.finish(T0 + 40, "cleared")
    assert ref is not None and ref.truncated and ref.duration == 12.0
    info = store.get(ref.event_id)
    assert info is not None
    assert np.array_equal(read_flac(info.audio_path), pcm[:12 * RATE])
    windows = store.windows(ref.event_id)
    assert windows.start.size == len(fed) == 7
    assert np.array_equal(windows.members[0]["emb"][:, 0], np.arange(7, dtype=np.float32))


# -- embeddings ------------------------------------------------------------------------------------------------


def test_embeddings_of_two_models_with_two_layers_round_trip(store: EvidenceStore) -> None:
    rng = np.random.default_rng(4)
    event_id = new_id()
    writer = store.open_clip(event_id, "fan", RATE, {"model": "mn04+ced-tiny"})
    dims = [{"mid": 24, "last": 16}, {"mid": 8, "last": 32}]
    sent = []
    starts = []
    for k in range(6):
        embs = None if k == 3 else [{layer: rng.standard_normal((1, d)).astype(np.float32)
                                     for layer, d in member.items()} for member in dims]
        sent.append(embs)
        starts.append(T0 + k * 5.0)
        samples = rng.standard_normal(10 * RATE).astype(np.float32) * 0.1
        writer.add_window(starts[-1], samples, RATE, None if k == 0 else k / 10, embs, in_episode=k >= 2)
    assert writer.finish(T0 + 40, "cleared") is not None

    got = make_store(store.directory).windows(event_id)  # from disk, through a new store
    assert np.array_equal(got.start, np.array(starts)) and got.start.dtype == np.float64
    assert np.isnan(got.score[0]) and np.allclose(got.score[1:], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert got.in_episode.tolist() == [False, False, True, True, True, True]
    assert len(got.members) == 2
    for m, member in enumerate(dims):
        assert set(got.members[m]) == set(member)
        for layer, d in member.items():
            table = got.members[m][layer]
            assert table.shape == (6, d) and table.dtype == np.float32
            assert np.isnan(table[3]).all()  # the window without embeddings
            for k in (0, 1, 2, 4, 5):
                embs = sent[k]
                assert embs is not None and np.array_equal(table[k], embs[m][layer][0])


# -- quota -----------------------------------------------------------------------------------------------------


def test_quota_evicts_the_oldest_unlabelled_never_a_labelled_or_open_clip(tmp_path: Path) -> None:
    store = make_store(tmp_path / "ev", max_bytes=1_000_000)
    ids = [record(store, 10, seed=10 + i) for i in range(5)]  # about 275 kB each
    store.label(ids[0], "true_positive")
    open_writer = store.open_clip(new_id(), "fan", RATE, {})
    feed(open_writer, pcm_signal(10, seed=20), 5.0, 5.0)
    sizes = {c.event_id: c.bytes for c in store.list()}
    assert [c.event_id for c in store.list()] == ids  # oldest first
    assert store.usage()["bytes"] == sum(sizes.values()) + open_writer.bytes_written > 1_000_000

    total = store.usage()["bytes"]
    expected = []
    for event_id in ids[1:]:
        if total <= 1_000_000:
            break
        expected.append(event_id)
        total -= sizes[event_id]
    evicted = store.enforce_quota()
    assert evicted == expected and len(evicted) >= 1
    assert ids[0] not in evicted and store.get(ids[0]) is not None
    for event_id in evicted:
        assert store.get(event_id) is None
        assert not list(store.directory.glob(f"{event_id}*"))
    assert store.usage()["bytes"] <= 1_000_000 and store.usage()["evicted"] == len(evicted)
    assert store.enforce_quota() == []
    assert open_writer.finish(T0 + 8, "cleared") is not None  # the open clip was never touched


def test_max_clips(tmp_path: Path) -> None:
    store = make_store(tmp_path / "ev", max_clips=2)
    ids = [record(store, 5, seed=30 + i) for i in range(4)]
    assert store.enforce_quota() == ids[:2]
    assert [c.event_id for c in store.list()] == ids[2:]
    assert store.usage()["clips"] == 2


def test_a_clip_larger_than_the_quota_is_kept_while_open_and_evicted_first(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = make_store(tmp_path / "ev", max_bytes=1_000_000)
    small = [record(store, 5, seed=40 + i) for i in range(2)]
    writer = store.open_clip(new_id(), "fan", RATE, {})
    feed(writer, pcm_signal(40, seed=42), 5.0, 5.0)
    assert writer.bytes_written > 1_000_000
    assert store.enforce_quota() == []  # while open: kept, and it pushes no other clip out
    ref = writer.finish(T0 + 40, "cleared")
    assert ref is not None
    assert store.enforce_quota() == [ref.event_id]
    assert [c.event_id for c in store.list()] == small
    assert events(caplog, "evidence_clip_over_quota")


# -- labels ----------------------------------------------------------------------------------------------------


def test_labels_persist_and_can_be_cleared(store: EvidenceStore) -> None:
    event_id = record(store, 5)
    info = store.label(event_id, "false_positive", note="door slam", extra={"by": "ops"})
    assert info.label == "false_positive" and store.usage()["labelled"] == 1
    again = make_store(store.directory).get(event_id)
    assert again is not None and again.label == "false_positive"
    assert again.meta["note"] == "door slam" and again.meta["label_extra"] == {"by": "ops"}
    assert again.meta["labelled_at"] and again.sha256 == info.sha256
    assert again.bytes == sum(p.stat().st_size for p in (again.audio_path, again.windows_path, again.meta_path))

    cleared = store.label(event_id, None)
    assert cleared.label is None and store.usage()["labelled"] == 0
    assert make_store(store.directory).get(event_id).label is None  # type: ignore[union-attr]

    with pytest.raises(ValueError, match="'maybe'"):
        store.label(event_id, "maybe")
    with pytest.raises(ValueError, match="extra"):
        store.label(event_id, "true_positive", extra={"x": object()})
    with pytest.raises(EvidenceNotFound, match="not in the store"):
        store.label(new_id(), "true_positive")
    writer = store.open_clip(new_id(), "fan", RATE, {})
    with pytest.raises(EvidenceNotFound, match="still being recorded"):
        store.label(writer.event_id, "true_positive")
    writer.abort("test")


# -- recovery --------------------------------------------------------------------------------------------------


def test_recover_finalizes_a_clip_cut_short_by_a_crash(tmp_path: Path) -> None:
    directory = tmp_path / "ev"
    old = make_store(directory)
    pcm = pcm_signal(30, seed=5)
    event_id = new_id()
    writer = old.open_clip(event_id, "pump", RATE, {"model": "mn04", "bank": "b1"})
    feed(writer, pcm, 10.0, 5.0)  # never finished: the process "dies" here
    assert (directory / f"{event_id}.partial.flac").exists()

    store = make_store(directory)
    assert store.get(event_id) is None and store.list() == []
    assert store.recover() == [event_id]
    info = store.get(event_id)
    assert info is not None
    audio = read_flac(info.audio_path)
    assert 30 * RATE - 4096 <= audio.size <= 30 * RATE  # libFLAC holds back at most one block
    assert np.array_equal(audio, pcm[:audio.size])
    assert info.meta["interrupted"] is True and info.meta["source"] == "pump"
    assert info.meta["context"] == {"model": "mn04", "bank": "b1"} and info.start == T0
    assert info.meta["frames"] == audio.size and info.sha256 == hashlib.sha256(info.audio_path.read_bytes()).hexdigest()
    assert store.windows(event_id).start.size == 0
    assert not (directory / f"{event_id}.partial.flac").exists()
    assert make_store(directory).get(event_id) is not None
    assert store.recover() == []


def test_recover_keeps_the_windows_when_only_the_meta_was_missing(store: EvidenceStore) -> None:
    event_id = new_id()
    writer = store.open_clip(event_id, "fan", RATE, {})
    feed(writer, pcm_signal(20, seed=6), 10.0, 5.0, embeddings=True)
    assert writer.finish(T0 + 20, "cleared") is not None
    (store.directory / f"{event_id}.json").unlink()  # as if the power went between the rename and the meta

    fresh = make_store(store.directory)
    assert fresh.recover() == [event_id]
    assert fresh.windows(event_id).members[0]["emb"].shape == (3, 4)
    assert fresh.get(event_id).meta["interrupted"] is True  # type: ignore[union-attr]


def test_hostile_files_are_skipped_then_cleaned_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    directory = tmp_path / "ev"
    good = record(make_store(directory), 5, seed=7)
    readable = record(make_store(directory), 5, seed=8)
    d = directory
    (d / f"{readable}.json").write_text("{not json")  # broken meta, audio fine: recovered
    not_json = new_id()
    (d / f"{not_json}.json").write_text("\x00\xff garbage")  # broken meta, no audio: removed
    wrong_types = new_id()
    meta = json.loads((d / f"{good}.json").read_text())
    (d / f"{wrong_types}.json").write_text(json.dumps({**meta, "event_id": wrong_types, "sample_rate": "fast",
                                                       "start_epoch": None}))
    (d / f"{wrong_types}.flac").write_bytes((d / f"{good}.flac").read_bytes())
    no_audio = new_id()
    (d / f"{no_audio}.json").write_text(json.dumps({**meta, "event_id": no_audio}))
    linked = new_id()
    (d / f"{linked}.json").write_text(json.dumps({**meta, "event_id": linked}))
    outside = tmp_path / "outside.flac"
    outside.write_bytes((d / f"{good}.flac").read_bytes())
    (d / f"{linked}.flac").symlink_to(outside)
    (d / "bad id!.json").write_text(json.dumps(meta))
    (d / f".{good}.json.abc123.tmp").write_text("half")
    (d / "README.txt").write_text("not ours")
    garbage_partial = new_id()
    (d / f"{garbage_partial}.partial.flac").write_bytes(b"fLaC" + b"\x00" * 10)

    store = make_store(directory)
    assert [c.event_id for c in store.list()] == [good]
    skipped = [r.fields["path"] for r in events(caplog, "evidence_file_skipped")]  # type: ignore[attr-defined]
    names = sorted(Path(p).name for p in skipped)
    assert names == sorted([f"{readable}.json", f"{not_json}.json", f"{wrong_types}.json", f"{no_audio}.json",
                            f"{linked}.json", f"{linked}.flac", "bad id!.json", "README.txt"])

    assert store.recover() == sorted([readable, wrong_types])
    assert sorted(c.event_id for c in store.list()) == sorted([good, readable, wrong_types])
    left = sorted(p.name for p in d.iterdir())
    assert left == sorted([f"{i}.{ext}" for i in (good, readable, wrong_types) for ext in ("flac", "npz", "json")]
                          + ["README.txt"])
    assert outside.exists()  # the link is removed, never its target
    assert np.array_equal(read_flac(d / f"{readable}.flac"), pcm_signal(5, seed=8))
    for bad_id in ("../etc", f"{good}\n", "", "x" * 65):
        with pytest.raises(ValueError, match=re.escape(repr(bad_id))):
            store.get(bad_id)
    (d / f"{good}.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match=re.escape(f"{good}.npz")):
        store.windows(good)


# -- a full disk -----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (CI runs as root) to fill up."""
    with tmpfs(tmp_path / "tiny", "4m") as mount:
        yield mount


def fill(directory: Path) -> Path:
    """Write a filler file until the disk is full."""
    path = directory / f"filler-{time.monotonic_ns()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return path


def test_a_full_disk_loses_the_clip_being_written_and_nothing_else(tiny_disk: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = make_store(tiny_disk / "evidence")
    kept = record(store, 10, seed=9)
    kept_info = store.get(kept)
    assert kept_info is not None

    pcm = pcm_signal(60, seed=10)
    writer = store.open_clip(new_id(), "fan", RATE, {})
    starts = window_starts(pcm.size, 10.0, 5.0)
    for k in range(3):
        writer.add_window(T0 + 5.0 * k, pcm[starts[k]:starts[k] + 10 * RATE] / 32768.0, RATE, 0.1, None, True)
    assert not writer.failed
    filler = fill(tiny_disk)
    for k in range(3, len(starts)):  # never raises
        writer.add_window(T0 + 5.0 * k, pcm[starts[k]:starts[k] + 10 * RATE] / 32768.0, RATE, 0.1, None, True)
    assert writer.failed and writer.error is not None and "No space left" in writer.error
    assert writer.finish(T0 + 60, "cleared") is None
    assert not list(store.directory.glob(f"{writer.event_id}*"))
    assert len(events(caplog, "evidence_write_failed")) == 1
    assert store.usage()["write_errors"] == 1 and store.usage()["open"] == 0

    assert store.get(kept) == kept_info
    assert hashlib.sha256(kept_info.audio_path.read_bytes()).hexdigest() == kept_info.sha256
    assert np.array_equal(read_flac(kept_info.audio_path), pcm_signal(10, seed=9))

    filler.unlink()
    again = record(store, 5, seed=11)
    assert [c.event_id for c in store.list()] == [kept, again]

    # the disk fills between the last window and finish: the clip is lost at finish, cleanly
    late = store.open_clip(new_id(), "fan", RATE, {})
    feed(late, pcm_signal(20, seed=12), 5.0, 5.0)
    filler = fill(tiny_disk)
    assert late.finish(T0 + 20, "cleared") is None and late.failed
    assert not list(store.directory.glob(f"{late.event_id}*")) and not list(store.directory.glob(".*"))
    assert store.usage()["write_errors"] == 2
    filler.unlink()
    assert [c.event_id for c in make_store(store.directory).list()] == [kept, again]


# -- transfer --------------------------------------------------------------------------------------------------


def test_read_chunk_bounds_and_content(store: EvidenceStore) -> None:
    event_id = record(store, 40, seed=12)  # about 1 MB of FLAC
    info = store.get(event_id)
    assert info is not None and info.audio_bytes > 300_000
    data = b""
    while len(data) < info.audio_bytes:
        data += store.read_chunk(event_id, len(data), 300_000)
    assert data == info.audio_path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == info.sha256 == info.ref().sha256
    assert store.read_chunk(event_id, info.audio_bytes, 10) == b""
    assert len(store.read_chunk(event_id, 0, MAX_CHUNK)) == min(MAX_CHUNK, info.audio_bytes)

    for offset, size, bad in [(-1, 10, "-1"), (0, 0, "0"), (0, MAX_CHUNK + 1, str(MAX_CHUNK + 1)),
                              (info.audio_bytes + 1, 10, str(info.audio_bytes + 1)), (True, 10, "True"),
                              (0, 1.5, "1.5")]:
        with pytest.raises(ValueError, match=re.escape(bad)):
            store.read_chunk(event_id, offset, size)  # type: ignore[arg-type]
    with pytest.raises(EvidenceNotFound):
        store.read_chunk(new_id(), 0, 10)
    assert issubclass(EvidenceNotFound, ValueError) and issubclass(EvidenceNotFound, LookupError)
    store.enforce_quota()
    store2 = make_store(store.directory, max_clips=1)
    store2.open_clip(new_id(), "fan", RATE, {})  # an open clip counts: the finished one must go
    assert store2.enforce_quota() == [event_id]
    with pytest.raises(EvidenceNotFound, match="not in the store"):
        store2.read_chunk(event_id, 0, 10)
    with pytest.raises(ValueError, match="'a/b'"):
        store.read_chunk("a/b", 0, 10)


def test_control_thread_reads_while_the_inference_thread_records_and_evicts(tmp_path: Path) -> None:
    store = make_store(tmp_path / "ev", max_clips=3)
    done = threading.Event()
    problems: list[BaseException] = []

    def inference() -> None:
        try:
            for i in range(25):
                record(store, 5, seed=100 + i)
                store.enforce_quota()
        except BaseException as exc:
            problems.append(exc)
        finally:
            done.set()

    def control() -> None:
        while not done.is_set():
            try:
                store.usage()
                for info in store.list():
                    with contextlib.suppress(EvidenceNotFound):
                        assert store.read_chunk(info.event_id, 0, 4)[:4] == b"fLaC"
                        store.windows(info.event_id)
                        store.label(info.event_id, "true_positive")
                        store.label(info.event_id, None)
            except BaseException as exc:
                problems.append(exc)
                return

    threads = [threading.Thread(target=inference), threading.Thread(target=control)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not problems, problems
    store.enforce_quota()
    clips = store.list()
    assert len(clips) == 3 and store.usage()["evicted"] == 22
    on_disk = sum(p.stat().st_size for p in store.directory.iterdir())
    assert store.usage()["bytes"] == on_disk == sum(c.bytes for c in clips)
    with pytest.raises(EvidenceNotFound, match="not in the store"):
        store.read_chunk(str(uuid.UUID(int=0)), 0, 10)


def test_abort_and_empty_clips_leave_nothing(store: EvidenceStore) -> None:
    writer = store.open_clip(new_id(), "fan", RATE, {})
    feed(writer, pcm_signal(10, seed=13), 5.0, 5.0)
    writer.abort("source stopped")
    empty = store.open_clip(new_id(), "fan", RATE, {})
    assert empty.finish(T0, "cleared") is None
    assert list(store.directory.iterdir()) == []
    assert store.usage()["open"] == 0 and store.usage()["write_errors"] == 0
    duplicate = record(store, 5, seed=14)
    again = store.open_clip(duplicate, "fan", RATE, {})
    assert again.failed and again.error is not None and "exists" in again.error
    assert again.finish(T0, "cleared") is None and store.get(duplicate) is not None
