"""Log formats of the agent (key=value or JSON lines on stderr) and their setup."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from edge_agent.alerts import iso_time
from edge_agent.config import LoggingConfig


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " traceback=" + json.dumps(self.formatException(record.exc_info))
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": iso_time(record.created), "level": record.levelname.lower(),
                                "logger": record.name}
        message = record.getMessage()
        fields = _parse_kv(message)
        data.update(fields if fields else {"msg": message})
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _parse_kv(message: str) -> dict[str, str]:
    out = {}
    for part in message.split(" "):
        key, sep, value = part.partition("=")
        if not sep or not key.isidentifier():
            return {}
        out[key] = value
    return out


def setup_logging(cfg: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if cfg.format == "json" else _KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(cfg.level.upper())
    logging.getLogger("edge_agent.paho").setLevel(max(logging.INFO, root.level))
