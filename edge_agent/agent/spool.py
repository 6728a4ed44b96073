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

import json
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from edge_agent.fsutil import replacing
from edge_agent.logs import get_logger

log = get_logger(__name__)

MESSAGES = "messages.log"
ACKS = "acks.log"
COMPACT_AFTER = 256  # acked lines before messages.log is rewritten


@dataclass(frozen=True)
class SpoolStats:
    pending: int  # messages not yet acknowledged by the broker
    bytes: int
    dropped: int  # messages discarded because the spool was full (since start)


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
    def __init__(self, directory: Path, max_messages: int, max_bytes: int):
        self.dir = Path(directory)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dropped = 0  # messages discarded because the spool was full (since start)
        self.recovered_torn = 0  # torn or corrupt lines skipped at load
        self._pending: OrderedDict[int, SpoolRecord] = OrderedDict()
        self._bytes = 0
        self._acked_lines = 0
        self._next_seq = 1
        self._load()
        self._messages = open(self.dir / MESSAGES, "a", encoding="utf-8")  # noqa: SIM115 - held open
        self._acks = open(self.dir / ACKS, "a", encoding="utf-8")  # noqa: SIM115 - held open

    # --- public ------------------------------------------------------------------------------------

    def append(self, topic: str, payload: str, qos: int, retain: bool = False) -> SpoolRecord:
        record = SpoolRecord(self._next_seq, topic, payload, qos, retain)
        self._next_seq += 1
        self._write(self._messages, _line(record))
        self._pending[record.seq] = record
        self._bytes += record.size
        self._enforce_bounds()
        return record

    def ack(self, seq: int) -> None:
        """The broker has the message (PUBACK for QoS 1, written to the socket for QoS 0)."""
        record = self._pending.pop(seq, None)
        if record is None:
            return
        self._bytes -= record.size
        # No fsync: a lost ack line only means one duplicate delivery after a crash (at-least-once),
        # and skipping it keeps a long replay from costing one disk flush per message.
        self._acks.write(f"{seq}\n")
        self._acks.flush()
        self._acked_lines += 1
        if self._acked_lines >= COMPACT_AFTER:
            self._compact()

    def pending(self) -> list[SpoolRecord]:
        return list(self._pending.values())

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def bytes(self) -> int:
        return self._bytes

    def stats(self) -> SpoolStats:
        return SpoolStats(len(self._pending), self._bytes, self.dropped)

    def close(self) -> None:
        for handle in (self._messages, self._acks):
            if not handle.closed:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()

    # --- internals ---------------------------------------------------------------------------------

    @staticmethod
    def _write(handle: object, line: str) -> None:
        handle.write(line)  # type: ignore[attr-defined]
        handle.flush()  # type: ignore[attr-defined]
        os.fsync(handle.fileno())  # type: ignore[attr-defined]

    def _enforce_bounds(self) -> None:
        while len(self._pending) > 1 and (len(self._pending) > self.max_messages or self._bytes > self.max_bytes):
            seq, oldest = next(iter(self._pending.items()))
            self.ack(seq)
            self.dropped += 1
            log.warning("spool_full", action="dropped_oldest", seq=seq, topic=oldest.topic, dropped_total=self.dropped,
                        max_messages=self.max_messages, max_bytes=self.max_bytes)

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
            self._messages.close()
        self._messages = open(self.dir / MESSAGES, "a", encoding="utf-8")  # noqa: SIM115
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
