"""The hot loop decides under the runtime lock and publishes after releasing it: a slow disk or network
behind the outputs never holds up a config swap or an enroll."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from edge_agent.agent.config import parse_config
from edge_agent.agent.daemon import Agent

from .agent_helpers import write_anomaly_wav


def test_outputs_are_called_without_the_runtime_lock_held(tmp_path: Path, toy_model: Path, bank_dir: Path) -> None:
    write_anomaly_wav(tmp_path / "fan.wav", 12, (4, 8))
    cfg = parse_config(f"""
node: lock-node
model: {{path: {toy_model}}}
sources:
  - {{name: fan, type: file, path: fan.wav, realtime: false, bank: {bank_dir}, window_seconds: 1, hop_seconds: 1,
      publish_scores: true, hysteresis: {{raise_after: 1, clear_after: 20}}}}
output: {{jsonl: alerts.jsonl, stdout: false}}
metrics: {{enabled: false}}
""", source="test", base_dir=tmp_path)
    agent = Agent(cfg, None)
    lock = agent.live.lock
    seen: list[tuple[str, bool]] = []

    def lock_is_free() -> bool:
        """Whether another thread can take the lock now (an RLock is re-entrant for its holder only)."""
        got: list[bool] = []

        def probe() -> None:
            ok = lock.acquire(timeout=2)
            if ok:
                lock.release()
            got.append(ok)

        thread = threading.Thread(target=probe)
        thread.start()
        thread.join()
        return got[0]

    def checked(kind: str, publish: Any) -> Any:
        def wrapper(source: str, payload: dict[str, Any]) -> None:
            seen.append((kind, lock_is_free()))
            publish(source, payload)
        return wrapper

    agent.outputs.publish_alert = checked("alert", agent.outputs.publish_alert)  # type: ignore[method-assign]
    agent.outputs.publish_score = checked("score", agent.outputs.publish_score)  # type: ignore[method-assign]
    assert agent.run() == 0
    kinds = [kind for kind, _ in seen]
    assert kinds.count("score") == 12 and kinds.count("alert") >= 2  # `new`, and `end` at shutdown
    assert all(free for _, free in seen), seen
