"""What a config pushed over MQTT may do beyond being a valid config.

A push may not change the `control` and `fleet` sections (the limits on pushes, what the node trusts: the
local file sets them), and every file or directory it names must lie under the push roots, or be one the
running config already names at the same key: so a push cannot make the agent read /etc/shadow as a
password file or write its spool into /etc. The local config file, which only someone on the device edits, may name
any path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_agent.agent.config import AgentConfig
from edge_agent.errors import ConfigError

LOCAL_ONLY = ("control", "fleet")  # the limits on pushes themselves, and what the node trusts


def push_roots(running: AgentConfig) -> list[Path]:
    """control.push_roots, else the state dir and the directories that hold the running models and banks."""
    if running.control.push_roots is not None:
        return [_resolved(p) for p in running.control.push_roots]
    roots = [running.state_dir, *(m.path.parent for m in running.model_configs)]
    roots += [src.bank.parent for src in running.sources if src.bank is not None]
    return list(dict.fromkeys(_resolved(p) for p in roots))


def check_push(raw: dict[str, Any], pushed: AgentConfig, running: AgentConfig) -> AgentConfig:
    """The pushed config as it will run (the running `control` section kept), or a ConfigError."""
    for section in LOCAL_ONLY:
        if section in raw and getattr(pushed, section) != getattr(running, section):
            raise ConfigError(section, "is set by the agent's local config file only; leave it out of a push")
    pushed = dataclasses.replace(pushed, **{section: getattr(running, section) for section in LOCAL_ONLY})
    roots = push_roots(running)
    known = dict(config_paths(running))
    for key, path in config_paths(pushed):
        if known.get(key) == path:
            continue
        resolved = _resolved(path)
        if not any(resolved == root or root in resolved.parents for root in roots):
            raise ConfigError(key, "a pushed config may only name files under "
                              + ", ".join(str(r) for r in roots) + " (control.push_roots)", str(path))
    return pushed


def config_paths(cfg: AgentConfig) -> list[tuple[str, Path]]:
    """Every path a config names, with its key path (sources[0].bank, mqtt.tls.ca_file, ...)."""
    return list(_paths(cfg, ""))


def _paths(value: Any, at: str) -> Iterator[tuple[str, Path]]:
    if isinstance(value, Path):
        yield at, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, f"{at}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            if field.name in (*LOCAL_ONLY, "source_file"):
                continue
            yield from _paths(getattr(value, field.name), f"{at}.{field.name}" if at else field.name)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))
