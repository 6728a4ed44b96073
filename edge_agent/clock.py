"""Time stamps as edge-asd writes them: UTC, ISO 8601, `Z` suffix."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def iso_time(epoch: float | None = None, timespec: str = "milliseconds") -> str:
    """`epoch` (default: now) as UTC ISO 8601 with a Z suffix, e.g. 2026-11-30T05:02:34.123Z."""
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def compact_stamp(epoch: float | None = None) -> str:
    """`epoch` (default: now) as a UTC stamp fit for file and ref names, e.g. 20261130T050234Z."""
    return datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC).strftime("%Y%m%dT%H%M%SZ")
