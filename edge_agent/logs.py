"""Log lines of edge-asd: an event name plus fields, written as key=value text or as JSON lines.

    log = get_logger(__name__)
    log.warning("device_lost", source="mic", reason="no audio frames for 5s", retry_in=2.0)

key=value:  ts=... level=warning logger=edge_agent.agent.sources event=device_lost source=mic
            reason="no audio frames for 5s" retry_in=2
JSON:       {"ts": "...", "level": "warning", "logger": "...", "event": "device_lost", "source": "mic", ...}

Both formats are built from the record's fields, never by parsing text: a value with spaces, quotes or
`=` is quoted (JSON string syntax) in key=value and kept as it is in JSON. Records from other libraries
(paho, onnxruntime) have no event and appear as `msg`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from edge_agent.clock import iso_time

_BARE = re.compile(r"^[A-Za-z0-9_.:/@+,%-]+$")  # values written without quotes in key=value lines


class EventLogger:
    """A logger whose every line is one event with named fields."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the traceback of the exception being handled."""
        self._log(logging.ERROR, event, fields, exc_info=True)

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, _Event(event, fields), exc_info=exc_info,
                            extra={"event": event, "fields": fields})


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


class _Event:
    """A record's message: renders as key=value text for any handler (pytest's caplog, basicConfig)."""

    def __init__(self, event: str, fields: dict[str, Any]) -> None:
        self.event, self.fields = event, fields

    def __str__(self) -> str:
        return format_kv({"event": self.event, **self.fields})


def format_kv(fields: dict[str, Any]) -> str:
    return " ".join(f"{key}={_kv_value(value)}" for key, value in fields.items())


def _kv_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, separators=(",", ":"), default=str)
    else:
        text = value if isinstance(value, str) else str(value)
    return text if _BARE.match(text) else json.dumps(text, ensure_ascii=False)


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        head = {"ts": iso_time(record.created), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and hasattr(record, "event"):
            line = format_kv({**head, "event": record.event, **fields})
        else:
            line = format_kv({**head, "msg": record.getMessage()})
        if record.exc_info:
            line += " traceback=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": iso_time(record.created), "level": record.levelname.lower(),
                                "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and hasattr(record, "event"):
            data["event"] = record.event
            for key, value in fields.items():
                data.setdefault(key, _json_value(value))
        else:
            data["msg"] = record.getMessage()
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "kv") -> None:
    """Route every log record to stderr in `fmt` ("kv" or "json") at `level` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # paho says only that a connection failed, once per retry; the agent logs the cause once per change
    # (mqtt.py), so paho's own lines are shown at debug level only.
    logging.getLogger("edge_agent.paho").setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.CRITICAL)
