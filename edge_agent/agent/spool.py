"""A bounded, durable, on-disk FIFO of outgoing MQTT messages.

Layout of the spool directory:
  messages.log  one line per message: `<crc32 hex> <json>` (seq, topic, qos, retain, payload)
  acks.log      one seq per line: delivered (PUBACK seen) or dropped (spool was full)
Both files are append-only. messages.log is fsynced on every append, so a crash or power cut loses
at most a torn last line, which the CRC detects and the loader drops; acks.log is flushed but not
fsynced (a lost ack costs a duplicate delivery, never a lost message). A message is pending until its seq is
in acks.log. When enough acked lines pile up, messages.log is rewritten (temp file, fsync, rename)
with the pending messages only and acks.log is truncated; a crash in between leaves stale seqs in
acks.log, which refer to nothing and are harmless.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from edge_agent.fsutil import atomic_write, replacing
from edge_agent.logs import get_logger

log = get_logger(__name__)

MESSAGES = "messages.log"
ACKS = "acks.log"
DROPS = "dropped.json"  # how many messages were ever dropped, and how many of those no operator acknowledged
RESERVE = "reserve"  # space kept for the spool on its disk, released when the disk is full
RESERVE_BYTES = 1 << 20
COMPACT_AFTER = 256  # acked lines before messages.log is rewritten
MAX_HELD = 1000  # messages kept in memory while the disk refuses writes


@dataclass(frozen=True)
class SpoolStats:
    pending: int  # messages not yet acknowledged by the broker
    bytes: int
    dropped: int  # messages discarded since the spool was created (spool full, or unwritable too long)
    held: int = 0  # messages kept in memory because the disk refused them (retried)
    unacknowledged_drops: int = 0  # drops no operator has acknowledged yet (`cmd/acknowledge`)
    write_error: str | None = None  # why the last write failed, while messages are held


@dataclass(frozen=True)
class SpoolRecord:
    seq: int
    topic: str
    payload: str
    qos: int
    retain: bool

    @property
    def size(self) -> int:
        return len(self.topic) + len(self.payload.encode()) + 32


class Spool:
    """Thread-safe: the agent's threads append, the MQTT worker hands, acknowledges and retries."""

    def __init__(self, directory: Path, max_messages: int, max_bytes: int, max_held: int = MAX_HELD):
        self.dir = Path(directory)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_held = max_held
        self.dir.mkdir(parents=True, exist_ok=True)
        self.recovered_torn = 0  # torn or corrupt lines skipped at load
        self._lock = threading.RLock()
        self._pending: OrderedDict[int, SpoolRecord] = OrderedDict()
        self._held: deque[SpoolRecord] = deque()
        self._write_error: str | None = None
        self._bytes = 0
        self._acked_lines = 0
        self._next_seq = 1
        self._drops = _DropCount(self.dir / DROPS)
        self._burst_drops = 0
        self._load()
        self._messages = os.open(self.dir / MESSAGES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._messages).st_size
        self._acks = open(self.dir / ACKS, "a", encoding="utf-8")  # noqa: SIM115 - held open
        self._ensure_reserve()

    # --- public ------------------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return self._drops.total

    def append(self, topic: str, payload: str, qos: int, retain: bool = False) -> SpoolRecord | None:
        """Write a message durably and return it; None when the disk refused it and it is held in memory
        (retry_held writes it later, in order)."""
        with self._lock:
            record = SpoolRecord(self._next_seq, topic, payload, qos, retain)
            self._next_seq += 1
            if self._held or not self._write_record(record):
                self._hold(record)
                return None
            self._accept(record)
            return record

    def retry_held(self) -> list[SpoolRecord]:
        """Write held messages, oldest first, until the disk refuses one; returns those written."""
        with self._lock:
            written = []
            while self._held and self._write_record(self._held[0]):
                record = self._held.popleft()
                self._accept(record)
                written.append(record)
            if written and not self._held:
                log.info("spool_write_recovered", written=len(written), pending=len(self._pending))
                self._write_error = None
                self._ensure_reserve()
            return written

    def ack(self, seq: int) -> None:
        """The broker has the message (PUBACK for QoS 1, written to the socket for QoS 0)."""
        with self._lock:
            if self._remove(seq):
                self._end_drop_burst()

    def _remove(self, seq: int) -> bool:
        with self._lock:
            record = self._pending.pop(seq, None)
            if record is None:
                return False
            self._bytes -= record.size
            # No fsync: a lost ack line only means one duplicate delivery after a crash (at-least-once),
            # and skipping it keeps a long replay from costing one disk flush per message.
            try:
                self._acks.write(f"{seq}\n")
                self._acks.flush()
            except OSError as exc:  # a full disk: the message may be delivered once more after a restart
                log.warning("spool_ack_not_written", seq=seq, error=exc)
                return True
            self._acked_lines += 1
            if self._acked_lines >= COMPACT_AFTER:
                try:
                    self._compact()
                except OSError as exc:  # tried again at the next ack
                    log.warning("spool_compaction_failed", error=exc)
            return True

    def acknowledge_drops(self) -> int:
        """An operator has seen the drops: health no longer reports them. Returns how many there were."""
        with self._lock:
            return self._drops.acknowledge()

    def pending(self) -> list[SpoolRecord]:
        with self._lock:
            return list(self._pending.values())

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def bytes(self) -> int:
        return self._bytes

    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(len(self._pending), self._bytes, self._drops.total, len(self._held),
                              self._drops.unacknowledged, self._write_error)

    def close(self) -> None:
        with self._lock:
            self.retry_held()
            if self._held:  # the disk still refuses them and the process ends: count them, say so
                log.error("spool_dropped", reason="unwritable at shutdown", messages=len(self._held),
                          error=self._write_error)
                self._drops.add(len(self._held))
                self._held.clear()
            try:
                os.fsync(self._messages)
            except OSError as exc:
                log.warning("spool_sync_failed", error=exc)
            os.close(self._messages)
            if not self._acks.closed:
                try:
                    self._acks.flush()
                    os.fsync(self._acks.fileno())
                except OSError as exc:
                    log.warning("spool_sync_failed", error=exc)
                self._acks.close()

    # --- internals ---------------------------------------------------------------------------------

    def _write_record(self, record: SpoolRecord) -> bool:
        """Append and fsync one line; on failure cut the file back to its last whole line (a torn line
        in the middle would hide every later line from the loader) and return False."""
        data = _line(record).encode()
        for attempt in range(2):
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._messages, view):]
                os.fsync(self._messages)
                self._size += len(data)
                return True
            except OSError as exc:
                with contextlib.suppress(OSError):  # a file that cannot be cut is found torn at the next load
                    os.ftruncate(self._messages, self._size)
                if attempt == 0 and exc.errno == errno.ENOSPC and self._release_reserve():
                    continue
                if self._write_error is None:  # once per burst of failures
                    log.error("spool_write_failed", error=exc, held=len(self._held) + 1,
                              action="kept in memory and retried")
                self._write_error = f"{exc.strerror or exc}"
                return False
        return False

    def _accept(self, record: SpoolRecord) -> None:
        self._pending[record.seq] = record
        self._bytes += record.size
        self._enforce_bounds()

    def _hold(self, record: SpoolRecord) -> None:
        self._held.append(record)
        if len(self._held) > self.max_held:
            lost = self._held.popleft()
            self._drops.add(1)
            if self._drops.unacknowledged == 1 or self._drops.unacknowledged % 100 == 0:
                log.error("spool_dropped", reason="held in memory too long", seq=lost.seq, topic=lost.topic,
                          dropped_total=self._drops.total, max_held=self.max_held)

    def _release_reserve(self) -> bool:
        reserve = self.dir / RESERVE
        if not reserve.exists():
            return False
        reserve.unlink()
        log.warning("spool_reserve_released", path=reserve, bytes=RESERVE_BYTES, cause="the disk is full")
        return True

    def _ensure_reserve(self) -> None:
        """Keep RESERVE_BYTES on the spool's disk for the spool, to give up when others fill the disk."""
        reserve = self.dir / RESERVE
        if reserve.exists():
            return
        try:
            with open(reserve, "wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, RESERVE_BYTES)
        except OSError:
            reserve.unlink(missing_ok=True)

    def _enforce_bounds(self) -> None:
        while len(self._pending) > 1 and (len(self._pending) > self.max_messages or self._bytes > self.max_bytes):
            seq, oldest = next(iter(self._pending.items()))
            self._remove(seq)
            self._drops.add(1)
            self._burst_drops += 1
            if self._burst_drops == 1:  # one line per burst: a long outage drops one message per new one
                log.warning("spool_full", action="dropped_oldest", seq=seq, topic=oldest.topic,
                            dropped_total=self._drops.total, max_messages=self.max_messages,
                            max_bytes=self.max_bytes)

    def _end_drop_burst(self) -> None:
        """A delivery made room: the burst of drops (if any) is over."""
        if self._burst_drops:
            log.warning("spool_drops_ended", dropped=self._burst_drops, dropped_total=self._drops.total)
            self._burst_drops = 0

    def _load(self) -> None:
        acked: set[int] = set()
        acks_path = self.dir / ACKS
        if acks_path.exists():
            for line in acks_path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip().isdigit():
                    acked.add(int(line))
            self._acked_lines = len(acked)
        path = self.dir / MESSAGES
        if not path.exists():
            return
        good_bytes = 0
        with open(path, "rb") as handle:
            for raw in handle:
                record = _parse_line(raw)
                if record is None:
                    self.recovered_torn += 1
                    break  # everything after a torn line is suspect: it was the tail being written
                good_bytes += len(raw)
                self._next_seq = max(self._next_seq, record.seq + 1)
                if record.seq not in acked:
                    self._pending[record.seq] = record
                    self._bytes += record.size
        if self.recovered_torn:
            log.warning("spool_torn_tail", path=path, kept_bytes=good_bytes)
            with open(path, "r+b") as handle:
                handle.truncate(good_bytes)
                os.fsync(handle.fileno())
        if acked:
            self._next_seq = max(self._next_seq, max(acked) + 1)
        if self._pending:
            log.info("spool_loaded", pending=len(self._pending), bytes=self._bytes)

    def _compact(self) -> None:
        with replacing(self.dir / MESSAGES) as tmp:
            tmp.write_text("".join(_line(r) for r in self._pending.values()), encoding="utf-8")
        os.close(self._messages)
        self._messages = os.open(self.dir / MESSAGES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._messages).st_size
        self._acks.close()
        # Seqs only need to be unique among lines that can meet: after this truncation no stale ack
        # remains, and before it (a crash right here) the loader starts above every seq it sees.
        self._acks = open(self.dir / ACKS, "w", encoding="utf-8")  # noqa: SIM115
        self._acks.flush()
        os.fsync(self._acks.fileno())
        self._acked_lines = 0


def _line(record: SpoolRecord) -> str:
    body = json.dumps({"seq": record.seq, "topic": record.topic, "qos": record.qos, "retain": record.retain,
                       "payload": record.payload}, separators=(",", ":"))
    return f"{zlib.crc32(body.encode()):08x} {body}\n"


def _parse_line(raw: bytes) -> SpoolRecord | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        crc, body = raw[:-1].split(b" ", 1)
        if int(crc, 16) != zlib.crc32(body):
            return None
        data = json.loads(body)
        return SpoolRecord(int(data["seq"]), str(data["topic"]), str(data["payload"]), int(data["qos"]),
                           bool(data["retain"]))
    except (ValueError, KeyError, TypeError):
        return None


class _DropCount:
    """Drops survive restarts: a crash must not reset the evidence that alerts were lost."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.total = 0
        self.unacknowledged = 0
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.total, self.unacknowledged = int(data["total"]), int(data["unacknowledged"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("spool_drop_count_unreadable", path=path, error=exc)

    def add(self, count: int) -> None:
        self.total += count
        self.unacknowledged += count
        self._save()

    def acknowledge(self) -> int:
        seen, self.unacknowledged = self.unacknowledged, 0
        self._save()
        return seen

    def _save(self) -> None:
        try:
            atomic_write(self.path, json.dumps({"total": self.total, "unacknowledged": self.unacknowledged}).encode())
        except OSError as exc:  # a full disk: kept in memory, written with the next change
            log.warning("spool_drop_count_not_saved", error=exc)
