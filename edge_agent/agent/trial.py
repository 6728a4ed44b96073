"""Trial and commit of pushed configs, like an A/B slot: a pushed config runs on trial until the agent is
healthy with it, and only then becomes the config file; otherwise the agent goes back to the config it had.

Beside the config file FILE:
  FILE             the committed config (what the operator wrote, or the last push that passed its trial)
  FILE.trial       a pushed config that needs a restart: the next start runs it on trial (JSON: request id,
                   config text, when it was pushed)
  FILE.rollback    a trial that failed, to be answered on config/result by the process that runs after it
  FILE.last-good   the last config that ran healthy: the fallback when FILE itself cannot start
All are written atomically (fsutil), so a power cut at any point leaves a config to start with.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.agent.runtime import Runtime
from edge_agent.fsutil import atomic_write
from edge_agent.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class PendingTrial:
    request_id: str | None
    text: str
    config_hash: str
    pushed_at: float
    changed: list[str] = field(default_factory=list)  # the sections that need the restart


@dataclass(frozen=True)
class Rollback:
    request_id: str | None
    config_hash: str | None
    reason: str
    at: float


class TrialFiles:
    def __init__(self, config_path: Path) -> None:
        self.config = Path(config_path)
        self.trial = self.config.with_name(self.config.name + ".trial")
        self.rollback = self.config.with_name(self.config.name + ".rollback")
        self.last_good = self.config.with_name(self.config.name + ".last-good")

    def write_trial(self, trial: PendingTrial) -> None:
        atomic_write(self.trial, json.dumps(asdict(trial)).encode(), mode=0o600)

    def read_trial(self) -> PendingTrial | None:
        data = self._read_json(self.trial)
        try:
            return None if data is None else PendingTrial(**data)
        except TypeError:
            log.error("trial_file_unreadable", path=self.trial)
            self.trial.unlink(missing_ok=True)
            return None

    def fail_trial(self, rollback: Rollback) -> None:
        """Record why the trial failed (answered after the restart) and drop the trial."""
        atomic_write(self.rollback, json.dumps(asdict(rollback)).encode(), mode=0o600)
        self.trial.unlink(missing_ok=True)

    def read_rollback(self) -> Rollback | None:
        """A failed trial not answered yet (the file stays until the answer is out: `rollback.unlink()`)."""
        data = self._read_json(self.rollback)
        try:
            return None if data is None else Rollback(**data)
        except TypeError:
            return None

    def commit(self, text: str) -> None:
        """`text` becomes the config file and the last-known-good one; a pending trial is done."""
        atomic_write(self.config, text.encode("utf-8"), mode=_mode(self.config))
        atomic_write(self.last_good, text.encode("utf-8"), mode=_mode(self.config))
        self.trial.unlink(missing_ok=True)

    def remember_good(self, text: str) -> None:
        atomic_write(self.last_good, text.encode("utf-8"), mode=_mode(self.config))

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("trial_file_unreadable", path=path, error=exc)
            return None
        return data if isinstance(data, dict) else None


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o644


@dataclass
class HealthCheck:
    """Is the agent healthy with the config it runs: every source delivers windows, inference works, the
    state (and spool) directory takes writes and, when `need_broker`, the broker connection is up. Checked until the
    deadline; it passes as soon as everything was seen at once."""

    runtime: Runtime
    deadline: float
    need_broker: bool
    broker_connected: Callable[[], bool | None]
    inference_errors: Callable[[], float]
    windows_at_start: dict[str, int] = field(default_factory=dict)
    errors_at_start: float = 0.0

    @classmethod
    def start(cls, runtime: Runtime, seconds: float, need_broker: bool, broker_connected: Callable[[], bool | None],
              inference_errors: Callable[[], float]) -> HealthCheck:
        # A window takes window_seconds to fill (sped up for file replay): give every source two of them.
        slowest = max((p.cfg.window_seconds / (p.cfg.speed if p.cfg.type in ("file", "folder") and p.cfg.realtime
                                               else 1.0)
                       for p in runtime.pipelines.values()), default=0.0)
        check = cls(runtime, time.monotonic() + max(seconds, 2.5 * slowest), need_broker, broker_connected,
                    inference_errors)
        check.windows_at_start = {name: p.source.health.windows for name, p in runtime.pipelines.items()}
        check.errors_at_start = inference_errors()
        return check

    def problems(self) -> list[str]:
        """What is not healthy yet (empty: healthy)."""
        found = [f"source {name} failed to load: {f.error}" for name, f in self.runtime.failed.items()]
        for name, p in self.runtime.pipelines.items():
            health = p.source.health
            if health.state in ("failed", "lost"):
                found.append(f"source {name} is {health.state}: {health.detail}")
            elif health.windows <= self.windows_at_start.get(name, 0) and health.state != "finished":
                found.append(f"source {name} has delivered no window yet")
        if self.inference_errors() > self.errors_at_start:
            found.append("inference failed on windows of the new config (see the log: event=inference_failed)")
        if self.need_broker and self.broker_connected() is False:
            found.append("the broker connection is not up")
        cfg = self.runtime.cfg
        directories = {"state": cfg.state_dir, **({"spool": cfg.spool_dir} if cfg.mqtt is not None else {})}
        for what, directory in directories.items():
            probe = directory / f".write-probe-{os.getpid()}"
            try:
                directory.mkdir(parents=True, exist_ok=True)
                atomic_write(probe, b"ok")
                probe.unlink()
            except OSError as exc:
                found.append(f"the {what} directory {directory} takes no writes ({exc.strerror})")
        return found

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline
