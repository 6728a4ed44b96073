"""Evidence clips: the audio of every alert episode and the embeddings of its windows, kept under a quota.

Layout of the store directory (`<state_dir>/evidence`, mode 0o750), `<id>` being the episode's event_id
(1 to 64 letters, digits or `-`):

  <id>.partial.flac   the clip while it is recorded: FLAC, PCM_16, mono, streamed as windows arrive. Its
                      header does not know its length yet; its COMMENT tag holds the clip's identity as
                      JSON (event_id, node, source, sample_rate, start, created, context), so that a clip
                      cut short by a crash can be finalized from this file alone.
  <id>.flac           the finished clip (the partial file, closed, fsynced and renamed).
  <id>.npz            the kept windows: `start` (float64 epoch seconds), `score` (float32, NaN when the
                      window was not scored), `in_episode` (bool), and per member model i and layer L an
                      array `m<i>/<L>` (float32 [N, D], a row of NaN where a window had no embedding).
  <id>.json           the meta, written last: its presence means the clip is finished. Keys:
                      schema_version, event_id, node, source, format ("flac"), sample_rate, start/start_epoch
                      (first sample), end/end_epoch (the episode's end, null if not known), audio_end/
                      audio_end_epoch, duration (seconds of audio), frames, bytes and sha256 (of the FLAC),
                      gaps ([{at, seconds}]: stream time missing from the audio, not padded), truncated
                      (audio capped at max_clip_seconds), windows, windows_dropped, context, label, note,
                      labelled_at, label_extra, reason, created_at/created_epoch (opened: the eviction
                      order), finished_at, interrupted (finalized by recover(): gaps and end unknown).
  .<name>.<rand>.tmp  a file being replaced (fsutil.replacing); left over only by a crash.

Finishing writes the npz, renames the partial file, then writes the json; every step is a complete file
(temporary name, fsync, rename), so a crash leaves either a finished clip or leftovers that `recover()`
turns into a finished clip (meta `interrupted: true`, its audio decoded as far as it is readable) or
removes. Sizes always come from the files (os.stat), never from the meta.

Threads: a ClipWriter belongs to one thread (the inference thread). The store's index is guarded by a lock
and may be read from any thread; disk I/O happens outside that lock.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import math
import os
import re
import stat
import threading
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf  # type: ignore[import-untyped]

from edge_agent.clock import iso_time
from edge_agent.fsutil import atomic_write, fsync_path, replacing, sha256_file
from edge_agent.logs import get_logger

log = get_logger(__name__)

SCHEMA_VERSION = 1
LABELS = ("false_positive", "true_positive")
MAX_WINDOWS = 10_000  # windows whose embeddings one clip keeps
MAX_CHUNK = 1 << 20  # bytes one read_chunk may return
MAX_NOTE = 1000  # characters of a label's note
MAX_EXTRA = 4096  # bytes of a label's extra fields as JSON
MAX_TAG = 8000  # characters of the COMMENT tag; a larger context is left out of it (the meta keeps it)
MAX_META = 4 << 20  # bytes of a meta file: anything larger was not written by this store
FILE_MODE = 0o640
DIR_MODE = 0o750
_DECODE_BLOCK = 4096

ID_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")  # used with fullmatch, as every pattern here
_CLIP_FILE = re.compile(r"(?P<id>[^.]*)\.(?P<kind>json|npz|flac|partial\.flac)")
_TEMP_FILE = re.compile(r"\.(?P<id>[A-Za-z0-9-]{1,64})\.(?:json|npz|flac)\..*\.tmp")
_MEMBER_KEY = re.compile(r"m(?P<index>\d{1,3})/(?P<layer>.+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Field metadata in the form the agent's config validation reads: lo, hi (inclusive), lo_open, pattern.
_RANGE = "lo", "hi", "lo_open", "pattern"


def _limits(lo: float, hi: float) -> dict[str, object]:
    return dict(zip(_RANGE, (lo, hi, False, None), strict=True))


@dataclass(frozen=True)
class EvidenceConfig:
    enabled: bool = True
    # audio kept before the first window over the threshold (the caller feeds it from its buffer)
    pre_roll_seconds: float = field(default=10.0, metadata=_limits(0.0, 600.0))
    # audio of one clip is capped; later windows still get their embeddings kept (up to MAX_WINDOWS)
    max_clip_seconds: float = field(default=300.0, metadata=_limits(1.0, 3600.0))
    max_bytes: int = field(default=500_000_000, metadata=_limits(1_000_000, 1_000_000_000_000))  # whole store
    max_clips: int = field(default=10_000, metadata=_limits(1, 1_000_000))


class EvidenceNotFound(LookupError, ValueError):
    """No finished clip with that event id (never recorded, evicted, or still being recorded). A ValueError
    too: for a command, an id that names no clip is a bad argument like a malformed one."""


@dataclass(frozen=True)
class ClipRef:
    """What an alert event carries about its clip."""

    event_id: str
    duration: float
    bytes: int  # of the FLAC file
    sha256: str  # of the FLAC file
    sample_rate: int
    start: float  # epoch seconds of the first sample
    end: float | None  # epoch seconds the episode ended (None: not known)
    truncated: bool

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.event_id, "duration": self.duration, "bytes": self.bytes, "sha256": self.sha256,
                "format": "flac", "sample_rate": self.sample_rate, "start": iso_time(self.start),
                "end": None if self.end is None else iso_time(self.end), "truncated": self.truncated}


@dataclass(frozen=True)
class ClipInfo:
    """A finished clip as the index knows it. `meta` is shared: read it, never change it."""

    event_id: str
    source: str
    audio_path: Path
    windows_path: Path
    meta_path: Path
    meta: dict[str, Any]
    bytes: int  # the clip's three files on disk (what the quota counts)
    audio_bytes: int  # the FLAC file alone (what a transfer sends)
    sha256: str  # of the FLAC file
    duration: float
    start: float  # epoch seconds of the first sample
    label: str | None
    created_at: float  # epoch seconds the clip was opened (eviction order)

    @property
    def sample_rate(self) -> int:
        return int(self.meta["sample_rate"])

    def ref(self) -> ClipRef:
        end = self.meta.get("end_epoch")
        return ClipRef(self.event_id, self.duration, self.audio_bytes, self.sha256, self.sample_rate, self.start,
                       float(end) if isinstance(end, (int, float)) else None, bool(self.meta.get("truncated")))

    def as_dict(self) -> dict[str, Any]:
        """The clip for a command reply: its ref plus source, label and bookkeeping."""
        keys = ("source", "label", "note", "labelled_at", "label_extra", "created_at", "interrupted", "windows",
                "gaps", "reason", "context")
        return {**self.ref().as_dict(), **{key: self.meta.get(key) for key in keys}, "bytes_on_disk": self.bytes}


@dataclass(frozen=True)
class ClipWindows:
    """The windows a clip kept: row i of every array is window i."""

    start: np.ndarray  # float64 [N] epoch seconds
    score: np.ndarray  # float32 [N], NaN where not scored
    in_episode: np.ndarray  # bool [N]
    members: list[dict[str, np.ndarray]]  # per member model {layer: float32 [N, D]}


def check_event_id(event_id: object) -> str:
    if not isinstance(event_id, str) or not ID_PATTERN.fullmatch(event_id):
        raise ValueError(f"evidence clip id {event_id!r}: expected 1 to 64 letters, digits or '-'")
    return event_id


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def _remove(path: Path, why: str) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("evidence_remove_failed", path=path, reason=why, error=_error_text(exc))


class _GuardedFile:
    """The partial FLAC file as libsndfile's virtual I/O sees it. libsndfile calls in from C, where a Python
    exception is lost, so a failed write is recorded here and every later write refused; the writer checks
    `error` after each call into soundfile."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        if self.error is not None:
            return 0
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                n = os.pwrite(self.fd, view[done:], self.pos + done)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as exc:
            self.error = exc
        self.pos += done
        self.size = max(self.size, self.pos)
        return done

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


class _LengthlessReader(sf.SoundFile):
    """Reads a FLAC file whose header does not know its length (a partial file). libsndfile cannot tell or
    seek in such a file, and soundfile tries to before every read when the file says it is seekable."""

    def seekable(self) -> bool:
        return False


def _to_pcm16(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if x.dtype == np.int16:
        return x
    scaled = np.rint(np.nan_to_num(x.astype(np.float32, copy=False), nan=0.0) * np.float32(32768.0))
    return np.clip(scaled, -32768, 32767).astype(np.int16)


class ClipWriter:
    """One open episode's clip. Used from one thread. Never raises an OSError into the caller: a write
    that fails stops the clip (`failed`, `error`), removes its partial file, and `finish` returns None.

    A window's place in the stream is its start time minus the first window's, in samples, rounded to the
    nearest sample; only the samples past what is written are appended, so 16-bit audio (int16 / 32768 as
    float32) comes back sample-exact over the span the windows cover."""

    def __init__(self, store: EvidenceStore, event_id: str, source: str, sample_rate: int,
                 context: dict[str, Any], created: float) -> None:
        self._store = store
        self.event_id = event_id
        self.source = source
        self.sample_rate = sample_rate
        self.context = context
        self.created = created
        self.partial_path = store.directory / f"{event_id}.partial.flac"
        self._max_frames = round(store.cfg.max_clip_seconds * sample_rate)
        self._file: _GuardedFile | None = None
        self._sound: Any = None  # the sf.SoundFile writing into _file
        self._origin: float | None = None  # epoch seconds of the first sample written
        self._end = 0  # stream position (samples after _origin) just after the last sample written
        self._frames = 0  # samples in the file (the stream span minus the gaps)
        self._gaps: list[dict[str, Any]] = []
        self._truncated = False
        self._windows: list[tuple[float, float, bool]] = []  # start, score (NaN: none), in_episode
        self._embeddings: dict[tuple[int, str], dict[int, np.ndarray]] = {}  # (member, layer) -> {row: [D]}
        self._windows_dropped = 0
        self._warned: set[str] = set()
        self._done = False
        self._ref: ClipRef | None = None
        self.failed = False
        self.error: str | None = None

    @property
    def seconds(self) -> float:
        return self._frames / self.sample_rate

    @property
    def bytes_written(self) -> int:
        return self._file.size if self._file is not None else 0

    # -- windows ---------------------------------------------------------------------------------------------

    def add_window(self, start_time: float, samples: np.ndarray, sample_rate: int, score: float | None,
                   embeddings: list[dict[str, np.ndarray]] | None, in_episode: bool) -> None:
        """Append the part of a window not written yet (windows come in time order and may overlap or leave
        gaps) and keep its score and embeddings."""
        if self._done or self.failed:
            return
        self._keep_window(start_time, score, embeddings, in_episode)
        if self._truncated:
            return
        if sample_rate != self.sample_rate:
            self._warn_once("rate", "evidence_window_skipped", reason=f"window at {sample_rate} Hz in a clip at "
                                                                       f"{self.sample_rate} Hz")
            return
        x = np.asarray(samples)
        if x.ndim != 1 or not _finite(start_time):
            self._warn_once("shape", "evidence_window_skipped", reason=f"expected mono samples [n] and a finite "
                                                                        f"start time, got shape {x.shape}")
            return
        try:
            self._append(float(start_time), x)
        except Exception as exc:  # the inference loop must never see the clip's troubles
            self._fail(exc)

    def _append(self, start_time: float, x: np.ndarray) -> None:
        if self._origin is None:
            self._open_file(start_time)
        assert self._origin is not None
        offset = round((start_time - self._origin) * self.sample_rate)
        if offset + x.size <= self._end:
            return  # out of order, or inside what is written already
        if offset > self._end:
            at = self._origin + self._end / self.sample_rate
            self._gaps.append({"at": iso_time(at), "at_epoch": at, "seconds": (offset - self._end) / self.sample_rate})
            new = x
        else:
            new = x[self._end - offset:]
        room = self._max_frames - self._frames
        if new.size > room:
            new = new[:room]
            self._truncated = True
        if new.size:
            self._write(_to_pcm16(new))
        self._end = offset + x.size

    def _open_file(self, start_time: float) -> None:
        fd = os.open(self.partial_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        self._file = _GuardedFile(fd)
        self._origin = start_time
        self._sound = sf.SoundFile(self._file, mode="w", samplerate=self.sample_rate, channels=1, format="FLAC",
                                   subtype="PCM_16")
        self._sound.comment = self._tag()  # libsndfile writes tags with the header: before any audio
        self._check_file()

    def _tag(self) -> str:
        tag = {"edge_asd_evidence": SCHEMA_VERSION, "event_id": self.event_id, "node": self._store.node,
               "source": self.source, "sample_rate": self.sample_rate, "start": self._origin,
               "created": self.created, "context": self.context}
        text = json.dumps(tag, separators=(",", ":"))
        if len(text) > MAX_TAG:
            text = json.dumps({**tag, "context": None}, separators=(",", ":"))
        return text

    def _write(self, pcm: np.ndarray) -> None:
        try:
            self._sound.write(pcm)
        except Exception:
            if self._file is None or self._file.error is None:
                raise
        self._check_file()
        self._frames += pcm.size

    def _check_file(self) -> None:
        if self._file is not None and self._file.error is not None:
            raise self._file.error

    def _keep_window(self, start_time: float, score: float | None, embeddings: list[dict[str, np.ndarray]] | None,
                     in_episode: bool) -> None:
        if len(self._windows) >= MAX_WINDOWS:
            self._windows_dropped += 1
            return
        row = len(self._windows)
        value = float(score) if score is not None and _finite(score) else math.nan
        self._windows.append((float(start_time), value, bool(in_episode)))
        for member, layers in enumerate(embeddings or []):
            for layer, vector in layers.items():
                self._keep_embedding(row, member, str(layer), vector)

    def _keep_embedding(self, row: int, member: int, layer: str, vector: np.ndarray) -> None:
        flat = np.asarray(vector, dtype=np.float32).reshape(-1)
        rows = self._embeddings.setdefault((member, layer), {})
        width = next(iter(rows.values())).size if rows else flat.size
        if flat.size != width or not flat.size:
            self._warn_once(f"dim {member} {layer}", "evidence_embedding_skipped", member=member, layer=layer,
                            reason=f"{flat.size} values where the clip's earlier windows have {width}")
            return
        rows[row] = flat.copy()

    def _warn_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(event, event_id=self.event_id, **fields)

    # -- end -------------------------------------------------------------------------------------------------

    def finish(self, end_time: float | None, reason: str) -> ClipRef | None:
        """Close the clip: FLAC closed and fsynced, then npz, rename, json. None if the clip was lost."""
        if self._done:
            return self._ref
        self._done = True
        if not self.failed and self._frames == 0:
            log.info("evidence_clip_empty", event_id=self.event_id, reason=reason)
            self._close_quietly()
            _remove(self.partial_path, "empty clip")
            self._store._release(self)
            return None
        if not self.failed:
            try:
                info = self._finalize(end_time if end_time is not None and _finite(end_time) else None, reason)
            except Exception as exc:  # a disk error loses this clip, never the caller's loop
                self._fail(exc)
                for path in self._store._paths(self.event_id):
                    _remove(path, "clip lost")
            else:
                self._store._add_finished(self, info)
                self._ref = info.ref()
                return self._ref
        self._store._release(self)
        return None

    def abort(self, reason: str) -> None:
        """Drop the clip and what was written of it."""
        if self._done:
            return
        self._done = True
        self._close_quietly()
        _remove(self.partial_path, f"aborted: {reason}")
        log.info("evidence_clip_aborted", event_id=self.event_id, reason=reason)
        self._store._release(self)

    def _finalize(self, end_time: float | None, reason: str) -> ClipInfo:
        assert self._file is not None and self._origin is not None
        try:
            self._sound.close()
        except Exception:
            if self._file.error is None:
                raise
        self._check_file()
        os.fsync(self._file.fd)
        os.close(self._file.fd)
        self._file.fd = -1
        store = self._store
        audio, windows, meta_path = store._paths(self.event_id)
        _write_npz(windows, self._window_arrays())
        os.rename(self.partial_path, audio)
        meta = _new_meta(
            audio, event_id=self.event_id, node=store.node, source=self.source, sample_rate=self.sample_rate,
            start=self._origin, span=self._end / self.sample_rate, end=end_time, frames=self._frames, gaps=self._gaps,
            truncated=self._truncated, windows=len(self._windows), windows_dropped=self._windows_dropped,
            context=self.context, reason=str(reason), created=self.created, interrupted=False)
        atomic_write(meta_path, _meta_bytes(meta), mode=FILE_MODE)
        return store._info_from_files(self.event_id, meta)

    def _window_arrays(self) -> dict[str, np.ndarray]:
        n = len(self._windows)
        arrays: dict[str, np.ndarray] = {
            "start": np.array([w[0] for w in self._windows], dtype=np.float64),
            "score": np.array([w[1] for w in self._windows], dtype=np.float32),
            "in_episode": np.array([w[2] for w in self._windows], dtype=bool),
        }
        for (member, layer), rows in sorted(self._embeddings.items()):
            if not rows:
                continue
            table = np.full((n, next(iter(rows.values())).size), np.nan, dtype=np.float32)
            for row, vector in rows.items():
                table[row] = vector
            arrays[f"m{member}/{layer}"] = table
        return arrays

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self.error = _error_text(exc)
        self._store._count_write_error()
        log.error("evidence_write_failed", event_id=self.event_id, path=self.partial_path, error=self.error,
                  seconds_written=round(self.seconds, 3))
        self._close_quietly()
        _remove(self.partial_path, "write failed")

    def _close_quietly(self) -> None:
        if self._file is not None and self._file.error is None and self._sound is not None:
            self._file.error = OSError("closed without finishing")  # the close below then writes nothing
        if self._sound is not None:
            with contextlib.suppress(Exception):  # a clip that is thrown away
                self._sound.close()
            self._sound = None
        if self._file is not None and self._file.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._file.fd)
            self._file.fd = -1


def _new_meta(audio: Path, *, event_id: str, node: str, source: str, sample_rate: int, start: float, span: float,
              end: float | None, frames: int, gaps: list[dict[str, Any]], truncated: bool, windows: int,
              windows_dropped: int, context: dict[str, Any], reason: str, created: float,
              interrupted: bool) -> dict[str, Any]:
    """The meta of a clip whose FLAC file `audio` is complete (its size and sha256 are read from it).
    span: seconds of stream the audio covers, gaps included."""
    return {
        "schema_version": SCHEMA_VERSION, "event_id": event_id, "node": node, "source": source, "format": "flac",
        "sample_rate": sample_rate, "start": iso_time(start), "start_epoch": start,
        "end": None if end is None else iso_time(end), "end_epoch": end, "audio_end": iso_time(start + span),
        "audio_end_epoch": start + span, "duration": frames / sample_rate, "frames": frames,
        "bytes": audio.stat().st_size, "sha256": sha256_file(audio), "gaps": gaps, "truncated": truncated,
        "windows": windows, "windows_dropped": windows_dropped, "context": context, "label": None, "note": None,
        "labelled_at": None, "label_extra": None, "reason": reason, "created_at": iso_time(created),
        "created_epoch": created, "finished_at": iso_time(), "interrupted": interrupted,
    }


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # numpy's stubs take **arrays for its allow_pickle flag (a keyword of savez since numpy 2.1; the names
    # here never clash with it)
    savez: Any = np.savez
    with replacing(path, mode=FILE_MODE) as tmp, open(tmp, "wb") as handle:
        savez(handle, **arrays)


class EvidenceStore:
    """The clips under one directory, with an in-memory index of the finished ones (built at start from
    their json files) so that usage() and quota checks do no disk I/O."""

    def __init__(self, directory: Path, cfg: EvidenceConfig, node: str) -> None:
        self.directory = Path(directory)
        self.cfg = cfg
        self.node = node
        self._lock = threading.Lock()  # guards the index, the open writers and the counters
        self._meta_lock = threading.Lock()  # orders meta rewrites (label) against recover's temp clean-up
        self._index: dict[str, ClipInfo] = {}
        self._open: dict[str, ClipWriter] = {}
        self._pinned: set[str] = set()  # clips whose label is being written: not evicted meanwhile
        self._bytes = 0  # of the finished clips
        self._labelled = 0
        self._evicted = 0
        self._write_errors = 0
        self._make_directory()
        scan = _scan(self.directory)
        self._load_index(scan)
        log.info("evidence_store_opened", path=self.directory, clips=len(self._index), bytes=self._bytes,
                 max_bytes=cfg.max_bytes, unfinished=sum("json" not in parts for parts in scan.clips.values()))

    def _load_index(self, scan: _Scan) -> None:
        """Index the finished clips; log each file that is skipped, once."""
        for path in scan.foreign:
            log.warning("evidence_file_skipped", path=path, reason="not named like a file of the evidence store")
        for path, why in scan.stray:
            if why != "temporary file":
                log.warning("evidence_file_skipped", path=path, reason=why)
        for event_id, parts in scan.clips.items():
            if "json" in parts:
                loaded = self._load_finished(event_id, parts)
                if isinstance(loaded, ClipInfo):
                    self._add(loaded)
                else:
                    log.warning("evidence_file_skipped", path=parts["json"], reason=loaded)

    def _make_directory(self) -> None:
        if not self.directory.exists():
            self.directory.mkdir(parents=True, mode=DIR_MODE)
        if self.directory.is_symlink() or not self.directory.is_dir():
            raise NotADirectoryError(f"{self.directory}: the evidence store must be a directory")
        os.chmod(self.directory, DIR_MODE)  # the machine's audio: not for every user (mkdir's mode meets the umask)

    def _paths(self, event_id: str) -> tuple[Path, Path, Path]:
        return (self.directory / f"{event_id}.flac", self.directory / f"{event_id}.npz",
                self.directory / f"{event_id}.json")

    # -- index -----------------------------------------------------------------------------------------------

    def _add(self, info: ClipInfo) -> None:
        self._drop(info.event_id)
        self._index[info.event_id] = info
        self._bytes += info.bytes
        self._labelled += info.label is not None

    def _drop(self, event_id: str) -> ClipInfo | None:
        info = self._index.pop(event_id, None)
        if info is not None:
            self._bytes -= info.bytes
            self._labelled -= info.label is not None
        return info

    def _add_finished(self, writer: ClipWriter, info: ClipInfo) -> None:
        with self._lock:
            self._open.pop(writer.event_id, None)
            self._add(info)
        log.info("evidence_clip_finished", event_id=info.event_id, seconds=round(info.duration, 3),
                 bytes=info.audio_bytes, windows=info.meta.get("windows"), truncated=info.meta.get("truncated"),
                 gaps=len(info.meta.get("gaps") or []))

    def _release(self, writer: ClipWriter) -> None:
        with self._lock:
            if self._open.get(writer.event_id) is writer:
                del self._open[writer.event_id]

    def _count_write_error(self) -> None:
        with self._lock:
            self._write_errors += 1

    def _info_from_files(self, event_id: str, meta: dict[str, Any]) -> ClipInfo:
        """A ClipInfo from a meta and the sizes of the files on disk (OSError if the FLAC is gone)."""
        audio, windows, meta_path = self._paths(event_id)
        audio_bytes = _regular_size(audio)
        if audio_bytes is None:
            raise FileNotFoundError(2, "no audio file (or not a regular file)", str(audio))
        total = audio_bytes + (_regular_size(windows) or 0) + (_regular_size(meta_path) or 0)
        return ClipInfo(event_id=event_id, source=str(meta["source"]), audio_path=audio, windows_path=windows,
                        meta_path=meta_path, meta=meta, bytes=total, audio_bytes=audio_bytes, sha256=meta["sha256"],
                        duration=float(meta["duration"]), start=float(meta["start_epoch"]), label=meta.get("label"),
                        created_at=float(meta["created_epoch"]))

    def _load_finished(self, event_id: str, parts: dict[str, Path]) -> ClipInfo | str:
        """The clip whose json is in `parts`, or why it is not a valid finished clip."""
        try:
            size = parts["json"].stat().st_size
            if size > MAX_META:
                return f"meta of {size} bytes, more than {MAX_META}"
            meta = json.loads(parts["json"].read_bytes())
        except (OSError, ValueError) as exc:
            return f"meta unreadable: {_error_text(exc)}"
        problem = _meta_problem(event_id, meta)
        if problem:
            return f"meta invalid: {problem}"
        if "flac" not in parts:
            return f"its audio {event_id}.flac is missing"
        try:
            info = self._info_from_files(event_id, meta)
        except OSError as exc:
            return f"its audio is unreadable: {_error_text(exc)}"
        if info.audio_bytes != meta["bytes"]:
            return f"its audio has {info.audio_bytes} bytes where the meta says {meta['bytes']} (changed on disk)"
        return info

    # -- clips -----------------------------------------------------------------------------------------------

    def open_clip(self, event_id: str, source: str, sample_rate: int, context: dict[str, Any],
                  max_seconds: float | None = None) -> ClipWriter:
        """A writer for a new clip (its audio capped at `max_seconds`, default evidence.max_clip_seconds: a learning
        recording is longer than an episode). An id already in the store gives a writer that is failed from the
        start."""
        check_event_id(event_id)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not 1000 <= sample_rate <= 384000:
            raise ValueError(f"evidence clip {event_id}: sample_rate {sample_rate!r} is not 1000..384000 Hz")
        if not isinstance(context, dict):
            raise ValueError(f"evidence clip {event_id}: context must be a mapping, got {type(context).__name__}")
        snapshot = _plain(context)
        writer = ClipWriter(self, event_id, str(source), sample_rate, snapshot, time.time())
        if max_seconds is not None:
            writer._max_frames = round(max_seconds * sample_rate)
        with self._lock:
            taken = event_id in self._open or event_id in self._index
            if not taken:
                self._open[event_id] = writer
        if taken:
            writer._done = writer.failed = True
            writer.error = f"evidence clip {event_id} exists already"
            log.warning("evidence_clip_exists", event_id=event_id)
        return writer

    def get(self, event_id: str) -> ClipInfo | None:
        check_event_id(event_id)
        with self._lock:
            return self._index.get(event_id)

    def list(self) -> list[ClipInfo]:
        """The finished clips, oldest first."""
        with self._lock:
            clips = list(self._index.values())
        return sorted(clips, key=_age_key)

    def _require(self, event_id: str, pin: bool = False) -> ClipInfo:
        """The finished clip `event_id`; pin: keep it from eviction until unpinned."""
        check_event_id(event_id)
        with self._lock:
            info = self._index.get(event_id)
            recording = event_id in self._open
            if info is not None and pin:
                self._pinned.add(event_id)
        if info is None:
            state = "is still being recorded" if recording else "is not in the store (never recorded, or evicted)"
            raise EvidenceNotFound(f"evidence clip {event_id} {state}")
        return info

    def label(self, event_id: str, label: str | None, note: str | None = None,
              extra: dict[str, Any] | None = None) -> ClipInfo:
        """Set (or clear, label=None) an operator's label; a labelled clip is never evicted. Raises
        EvidenceNotFound, ValueError (bad label, note or extra) or OSError (the meta could not be written)."""
        if label is not None and label not in LABELS:
            raise ValueError(f"evidence clip {event_id}: label {label!r} is not one of {', '.join(LABELS)} or null")
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            raise ValueError(f"evidence clip {event_id}: note must be text of at most {MAX_NOTE} characters")
        extra_copy = _extra_copy(event_id, extra)
        with self._meta_lock:
            info = self._require(event_id, pin=True)
            try:
                meta = {**info.meta, "label": label, "note": note, "label_extra": extra_copy,
                        "labelled_at": None if label is None and note is None else iso_time()}
                atomic_write(info.meta_path, _meta_bytes(meta), mode=FILE_MODE)
                new = self._info_from_files(event_id, meta)
                with self._lock:
                    if self._drop(event_id) is not None:
                        self._add(new)
            finally:
                with self._lock:
                    self._pinned.discard(event_id)
        log.info("evidence_labelled", event_id=event_id, label=label)
        return new

    def windows(self, event_id: str) -> ClipWindows:
        """The kept windows of a finished clip. ValueError naming the file if it is damaged."""
        info = self._require(event_id)
        try:
            return _load_windows(info.windows_path)
        except ValueError:
            if self.get(event_id) is None:
                raise EvidenceNotFound(f"evidence clip {event_id} was evicted meanwhile") from None
            raise

    def read_chunk(self, event_id: str, offset: int, size: int) -> bytes:
        """Up to `size` bytes of the clip's FLAC file from `offset` (b"" at its end)."""
        check_event_id(event_id)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"evidence clip {event_id}: offset {offset!r} must be a whole number >= 0")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_CHUNK:
            raise ValueError(f"evidence clip {event_id}: size {size!r} must be a whole number in 1..{MAX_CHUNK}")
        info = self._require(event_id)
        if offset > info.audio_bytes:
            raise ValueError(f"evidence clip {event_id}: offset {offset} is past the end of its audio "
                             f"({info.audio_bytes} bytes)")
        try:
            fd = os.open(info.audio_path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise EvidenceNotFound(f"evidence clip {event_id} was evicted meanwhile") from None
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    # -- quota -----------------------------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        with self._lock:
            open_bytes = sum(w.bytes_written for w in self._open.values())
            return {"clips": len(self._index), "bytes": self._bytes + open_bytes, "max_bytes": self.cfg.max_bytes,
                    "open": len(self._open), "labelled": self._labelled, "evicted": self._evicted,
                    "write_errors": self._write_errors}

    def enforce_quota(self) -> builtins.list[str]:
        """Evict finished, unlabelled clips until the store fits its quota. A clip larger than the whole quota
        goes first (it can never fit); then the oldest. Open and labelled clips are never evicted, and an open
        clip larger than the quota does not push the others out. Returns the evicted ids."""
        with self._lock:
            oversized, victims = self._choose_victims()
            for info in victims:
                self._drop(info.event_id)
            self._evicted += len(victims)
        for info in oversized:
            log.warning("evidence_clip_over_quota", event_id=info.event_id, bytes=info.bytes,
                        max_bytes=self.cfg.max_bytes)
        for info in victims:
            # audio first: a crash part-way leaves a meta without audio, which recover() removes
            for path in (info.audio_path, info.windows_path, info.meta_path):
                _remove(path, "evicted")
        if victims:
            log.info("evidence_evicted", count=len(victims), bytes=sum(v.bytes for v in victims),
                     ids=[v.event_id for v in victims])
        return [v.event_id for v in victims]

    def _choose_victims(self) -> tuple[builtins.list[ClipInfo], builtins.list[ClipInfo]]:
        """The clips over the quota on their own, and every clip to evict (those first)."""
        limit = self.cfg.max_bytes
        sizes = [w.bytes_written for w in self._open.values()] + [c.bytes for c in self._index.values()]
        total = sum(s for s in sizes if s <= limit)
        count = len(self._open) + len(self._index)
        candidates = sorted((c for c in self._index.values() if c.label is None and c.event_id not in self._pinned),
                            key=_age_key)
        oversized = [c for c in candidates if c.bytes > limit]
        victims = list(oversized)
        count -= len(victims)
        for info in candidates:
            if total <= limit and count <= self.cfg.max_clips:
                break
            if info.bytes <= limit:
                victims.append(info)
                total -= info.bytes
                count -= 1
        return oversized, victims

    # -- recovery --------------------------------------------------------------------------------------------

    def recover(self) -> builtins.list[str]:
        """Finalize the clips a crash left unfinished (audio decoded as far as readable, meta `interrupted`),
        remove what cannot be, and remove stray temporary files, symlinks and misnamed files. Call it at
        start, before recording. Returns the ids recovered."""
        scan = _scan(self.directory)
        with self._lock:
            busy = set(self._open)
            finished = set(self._index)
        recovered = []
        for event_id, parts in sorted(scan.clips.items()):
            if event_id in busy:
                continue
            if event_id in finished:
                if "partial" in parts:  # a finished clip has none: not this store's doing
                    log.info("evidence_leftover_removed", path=parts["partial"], reason="clip finished already")
                    _remove(parts["partial"], "clip finished already")
                continue
            if self._recover_clip(event_id, parts):
                recovered.append(event_id)
        with self._meta_lock:
            for path, why in scan.stray:
                match = _TEMP_FILE.fullmatch(path.name)
                if match is None or match["id"] not in busy:
                    log.info("evidence_leftover_removed", path=path, reason=why)
                    _remove(path, why)
        return recovered

    def _recover_clip(self, event_id: str, parts: dict[str, Path]) -> bool:
        if "json" in parts:
            problem = self._load_finished(event_id, parts)
            if isinstance(problem, ClipInfo):  # appeared since the index was built: take it as it is
                with self._lock:
                    self._add(problem)
                return False
            log.warning("evidence_meta_broken", path=parts["json"], reason=problem)
        source = parts.get("flac") or parts.get("partial")
        try:
            if source is None:
                raise ValueError("no audio")
            info = self._salvage(event_id, source, parts.get("npz"))
        except Exception as exc:  # whatever the leftover holds, it is removed
            for path in (*parts.values(), *self._paths(event_id)):
                _remove(path, "unrecoverable")
            log.warning("evidence_leftover_removed", event_id=event_id, files=sorted(p.name for p in parts.values()),
                        reason=_error_text(exc))
            return False
        if "partial" in parts:
            _remove(parts["partial"], "recovered")
        with self._lock:
            self._add(info)
        log.info("evidence_clip_recovered", event_id=event_id, seconds=round(info.duration, 3),
                 bytes=info.audio_bytes, windows=info.meta.get("windows"))
        return True

    def _salvage(self, event_id: str, source: Path, npz: Path | None) -> ClipInfo:
        audio, windows_path, meta_path = self._paths(event_id)
        frames, rate, tag = _transcode(source, audio)
        if not frames:
            audio.unlink(missing_ok=True)
            raise ValueError(f"{source.name}: no readable audio")
        kept = None
        if npz is not None:
            try:
                kept = _load_windows(npz)
            except (OSError, ValueError):
                kept = None
        if kept is None:
            _write_npz(windows_path, {"start": np.zeros(0), "score": np.zeros(0, np.float32),
                                      "in_episode": np.zeros(0, bool)})
        mtime = audio.stat().st_mtime
        start = float(tag["start"]) if _finite(tag.get("start")) else mtime - frames / rate
        created = float(tag["created"]) if _finite(tag.get("created")) else mtime
        context = tag.get("context")
        meta = _new_meta(
            audio, event_id=event_id, node=str(tag.get("node", self.node)), source=str(tag.get("source", "unknown")),
            sample_rate=rate, start=start, span=frames / rate, end=None, frames=frames, gaps=[],
            truncated=frames >= round(self.cfg.max_clip_seconds * rate),
            windows=0 if kept is None else int(kept.start.size), windows_dropped=0,
            context=_plain(context) if isinstance(context, dict) else {}, reason="interrupted", created=created,
            interrupted=True)
        atomic_write(meta_path, _meta_bytes(meta), mode=FILE_MODE)
        fsync_path(self.directory)
        return self._info_from_files(event_id, meta)


def _plain(value: Any) -> Any:
    """`value` as plain JSON (a snapshot): numpy scalars unwrapped, NaN and infinities as null, other
    objects as text."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _age_key(info: ClipInfo) -> tuple[float, float, str]:
    return info.created_at, info.start, info.event_id


def _regular_size(path: Path) -> int | None:
    """The size of `path` if it is a regular file (not a symlink), else None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _extra_copy(event_id: str, extra: dict[str, Any] | None) -> dict[str, Any] | None:
    if extra is None:
        return None
    if not isinstance(extra, dict):
        raise ValueError(f"evidence clip {event_id}: extra must be a mapping, got {type(extra).__name__}")
    try:
        text = json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"evidence clip {event_id}: extra is not plain JSON ({exc})") from None
    if len(text.encode()) > MAX_EXTRA:
        raise ValueError(f"evidence clip {event_id}: extra is {len(text.encode())} bytes as JSON, at most "
                         f"{MAX_EXTRA}")
    copy: dict[str, Any] = json.loads(text)
    return copy


def _meta_problem(event_id: str, meta: object) -> str | None:
    """What makes `meta` unusable as the meta of clip `event_id`, or None."""
    if not isinstance(meta, dict):
        return f"a JSON object expected, got {type(meta).__name__}"
    checks: Iterable[tuple[str, bool]] = (
        ("schema_version", meta.get("schema_version") == SCHEMA_VERSION),
        ("event_id", meta.get("event_id") == event_id),
        ("source", isinstance(meta.get("source"), str)),
        ("sample_rate", isinstance(meta.get("sample_rate"), int) and not isinstance(meta.get("sample_rate"), bool)
         and 1000 <= meta["sample_rate"] <= 384000),
        ("start_epoch", _finite(meta.get("start_epoch"))),
        ("created_epoch", _finite(meta.get("created_epoch"))),
        ("duration", _finite(meta.get("duration")) and meta["duration"] >= 0),
        ("bytes", isinstance(meta.get("bytes"), int) and not isinstance(meta.get("bytes"), bool)),
        ("sha256", isinstance(meta.get("sha256"), str) and bool(_SHA256.fullmatch(meta["sha256"]))),
        ("label", meta.get("label") is None or meta.get("label") in LABELS),
        ("end_epoch", meta.get("end_epoch") is None or _finite(meta.get("end_epoch"))),
        ("truncated", isinstance(meta.get("truncated", False), bool)),
        ("context", isinstance(meta.get("context", {}), dict)),
    )
    bad = [key for key, ok in checks if not ok]
    return f"bad or missing {', '.join(bad)}" if bad else None


@dataclass
class _Scan:
    clips: dict[str, dict[str, Path]] = field(default_factory=dict)  # id -> {json|npz|flac|partial: path}
    stray: list[tuple[Path, str]] = field(default_factory=list)  # what recover() removes, and why
    foreign: list[Path] = field(default_factory=list)  # not named like a file of the store: left alone


def _scan(directory: Path) -> _Scan:
    """Sort the directory's entries: parts of clips (regular files with valid names) and strays."""
    scan = _Scan()
    with os.scandir(directory) as entries:
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                scan.stray.append((path, "temporary file"))
                continue
            match = _CLIP_FILE.fullmatch(entry.name)
            if match is None:
                scan.foreign.append(path)
                continue
            if not ID_PATTERN.fullmatch(match["id"]):
                scan.stray.append((path, "not a valid event id in the file name"))
            elif entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                scan.stray.append((path, "not a regular file (a symlink?)"))
            else:
                kind = "partial" if match["kind"] == "partial.flac" else match["kind"]
                scan.clips.setdefault(match["id"], {})[kind] = path
    return scan


def _transcode(source: Path, audio: Path) -> tuple[int, int, dict[str, Any]]:
    """Decode `source` (a FLAC file, maybe cut short) as far as it is readable into a complete FLAC file at
    `audio` (replaced in one step). Returns frames, sample rate, and the identity tag (empty if unreadable)."""
    frames = 0
    with _LengthlessReader(str(source)) as reader:
        rate, channels = int(reader.samplerate), int(reader.channels)
        if channels != 1 or not 1000 <= rate <= 384000:
            raise ValueError(f"{source.name}: {channels} channels at {rate} Hz, not a clip of this store")
        text = reader.comment or ""
        with (replacing(audio, mode=FILE_MODE) as tmp,
              sf.SoundFile(str(tmp), mode="w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as out):
            if text:
                out.comment = text
            while True:
                try:
                    block = reader.read(_DECODE_BLOCK, dtype="int16")
                except RuntimeError:
                    break  # the torn end of a file cut short
                if not len(block):
                    break
                out.write(block)
                frames += len(block)
    return frames, rate, _parse_tag(text)


def _parse_tag(text: str) -> dict[str, Any]:
    try:
        tag = json.loads(text)
    except ValueError:
        return {}
    return tag if isinstance(tag, dict) and tag.get("edge_asd_evidence") == SCHEMA_VERSION else {}


def _load_windows(path: Path) -> ClipWindows:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ValueError(f"{path}: cannot open the clip's windows: {_error_text(exc)}") from None
    try:
        with os.fdopen(fd, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable npz file ({exc})") from None
    return _windows_from_arrays(path, arrays)


def _windows_from_arrays(path: Path, arrays: dict[str, np.ndarray]) -> ClipWindows:
    for key in ("start", "score", "in_episode"):
        if key not in arrays or arrays[key].ndim != 1:
            raise ValueError(f"{path}: array {key!r} missing or not one-dimensional")
    n = arrays["start"].size
    if arrays["score"].size != n or arrays["in_episode"].size != n:
        raise ValueError(f"{path}: start, score and in_episode differ in length")
    members: list[dict[str, np.ndarray]] = []
    for key, value in arrays.items():
        match = _MEMBER_KEY.fullmatch(key)
        if match is None:
            continue
        if value.ndim != 2 or value.shape[0] != n:
            raise ValueError(f"{path}: array {key!r} has shape {value.shape}, expected [{n}, D]")
        index = int(match["index"])
        while len(members) <= index:
            members.append({})
        members[index][match["layer"]] = value.astype(np.float32, copy=False)
    return ClipWindows(start=arrays["start"].astype(np.float64, copy=False),
                       score=arrays["score"].astype(np.float32, copy=False),
                       in_episode=arrays["in_episode"].astype(bool, copy=False), members=members)
