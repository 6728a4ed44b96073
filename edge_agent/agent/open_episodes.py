"""The alert episodes that are open, on disk (`<state_dir>/episodes.json`), so that every `new` gets its `end`:
after a crash or a power cut the next start ends each one (reason `restarted`, at the last window scored)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from edge_agent.fsutil import atomic_write
from edge_agent.logs import get_logger

log = get_logger(__name__)

FILE_NAME = "episodes.json"


class OpenEpisodes:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._open: dict[str, dict[str, Any]] = {}

    def left_open(self) -> dict[str, dict[str, Any]]:
        """Episodes a previous run left open (a damaged file is logged and treated as none)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("episodes_file_unreadable", path=self.path, error=exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, dict)}

    def set(self, source: str, snapshot: dict[str, Any] | None) -> None:
        """Record a source's open episode (None: it has none); written through to disk when it changes."""
        with self._lock:
            if snapshot is None and source not in self._open:
                return
            if snapshot is None:
                del self._open[source]
            else:
                self._open[source] = snapshot
            self._write()

    def clear(self) -> None:
        with self._lock:
            self._open.clear()
            self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(self._open).encode())
        except OSError as exc:  # the episodes still run; only a crash now would leave them without an end
            log.error("episodes_not_saved", path=self.path, error=exc)
