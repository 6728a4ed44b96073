"""Checks on the sections of a pushed config that take effect only at a restart, done before the restart:
as far as they can be without leaving the running config."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from edge_agent.agent.config import AgentConfig
from edge_agent.agent.connection import tls_context
from edge_agent.errors import ConfigError
from edge_agent.fsutil import atomic_write

RESOLVE_SECONDS = 5.0


def check_restart_sections(new: AgentConfig, changed: list[str]) -> None:
    """Directories creatable and writable, TLS files loadable, the broker's host resolvable; ConfigError."""
    if {"state_dir", "spool", "mqtt", "output"} & set(changed):
        check_directories(new)
    if "mqtt" in changed and new.mqtt is not None:
        if new.mqtt.tls is not None:
            tls_context(new.mqtt.tls)
        _resolvable(new.mqtt.host)


def check_directories(cfg: AgentConfig) -> None:
    """The directories the agent writes (state, evidence, spool or JSONL output) can be created and take files."""
    _writable("state_dir", cfg.state_dir)
    if cfg.evidence.enabled:
        _writable("evidence", cfg.state_dir / "evidence")
    if cfg.mqtt is not None:
        _writable("spool.dir", cfg.spool_dir)
    else:
        _writable("output.jsonl", cfg.jsonl_path.parent)


def _writable(key: str, directory: Path) -> None:
    probe = directory / f".edge-asd-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(probe, b"probe")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(key, f"cannot create or write files there ({exc.strerror})", str(directory)) from None


def _resolvable(host: str) -> None:
    """getaddrinfo has no timeout of its own: it runs on a helper thread that may outlive the answer."""
    found: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, None)
            found.append(None)
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=resolve, name="resolve", daemon=True)
    thread.start()
    thread.join(RESOLVE_SECONDS)
    if not found:
        raise ConfigError("mqtt.host", f"could not be resolved within {RESOLVE_SECONDS:g} s", host)
    if found[0] is not None:
        raise ConfigError("mqtt.host", f"does not resolve ({getattr(found[0], 'strerror', found[0])})", host)
