"""Metrics exposition over HTTP, sd_notify datagrams, structured logs, and the systemd unit."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent.metrics import AgentMetrics, MetricsServer
from edge_agent.agent.sdnotify import SystemdNotifier
from edge_agent.logs import get_logger, setup_logging

REPO = Path(__file__).resolve().parents[2]


def test_metrics_text_exposition_over_loopback_http() -> None:
    metrics = AgentMetrics()
    metrics.windows.labels(source="fan").inc()
    metrics.windows.labels(source="fan").inc(2)
    metrics.last_score.labels(source='we"ird').set(0.25)
    metrics.stage_seconds.labels(stage="embed").observe(0.02)
    metrics.add_collector(lambda: [GaugeMetricFamily("edge_agent_spool_messages", "waiting", value=7)])
    server = MetricsServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
    finally:
        server.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["edge_agent_windows"].type == "counter"
    assert families["edge_agent_windows"].documentation == "Windows scored, per source"
    assert samples[("edge_agent_windows_total", (("source", "fan"),))] == 3
    assert samples[("edge_agent_last_score", (("source", 'we"ird'),))] == 0.25
    assert samples[("edge_agent_stage_seconds_bucket", (("le", "0.025"), ("stage", "embed")))] == 1
    assert samples[("edge_agent_stage_seconds_bucket", (("le", "0.01"), ("stage", "embed")))] == 0
    assert samples[("edge_agent_stage_seconds_count", (("stage", "embed"),))] == 1
    assert samples[("edge_agent_spool_messages", ())] == 7
    assert not any(name.endswith("_created") for name, _ in samples)


def test_sd_notify_to_a_path_socket_and_watchdog_env(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "20000000"})
        assert notifier.enabled and notifier.watchdog_seconds == 20.0
        assert notifier.ready("monitoring 1 source(s)")
        assert sock.recv(256) == b"READY=1\nSTATUS=monitoring 1 source(s)"
        assert notifier.watchdog() and sock.recv(64) == b"WATCHDOG=1"
        assert notifier.stopping() and sock.recv(64) == b"STOPPING=1"
    assert not SystemdNotifier({}).enabled and SystemdNotifier({}).ready() is False
    assert SystemdNotifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_seconds is None


def _parse_kv(line: str) -> dict[str, object]:
    """A key=value line back into fields: bare values, or JSON strings for quoted ones."""
    out: dict[str, object] = {}
    for match in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        key, value = match.groups()
        out[key] = json.loads(value) if value.startswith('"') else value
    return out


def test_logs_are_key_value_or_json_lines_built_from_fields(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    log = get_logger("edge_agent.test")
    awkward = 'no audio frames for 5s; path="/a b/c=d" \\ done'
    try:
        setup_logging("info", "json")
        log.info("alert", source="fan", score=2.5, reason=awkward)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        data = json.loads(line)
        assert data["event"] == "alert" and data["source"] == "fan" and data["score"] == 2.5
        assert data["reason"] == awkward
        assert data["level"] == "info" and data["ts"].endswith("Z")
        setup_logging("info", "kv")
        log.warning("device_lost", source="mic", reason=awkward)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("ts=") and "level=warning" in line and "event=device_lost source=mic" in line
        fields = _parse_kv(line)
        assert fields["reason"] == awkward and fields["event"] == "device_lost" and fields["source"] == "mic"
        logging.getLogger("some.library").warning("plain text = with spaces")
        assert _parse_kv(capsys.readouterr().err.strip().splitlines()[-1])["msg"] == "plain text = with spaces"
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_systemd_unit_declares_notify_watchdog_and_hardening() -> None:
    unit = (REPO / "systemd" / "edge-agent.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "NotifyAccess=main", "User=edge-agent", "ProtectSystem=strict",
                 "StateDirectory=edge-agent", "DevicePolicy=closed", "DeviceAllow=char-alsa rw",
                 "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes"):
        assert line in unit, line
    # a config that cannot start (exit 2) is not restarted every 5 s forever; a crash loop is bounded
    for line in ("RestartPreventExitStatus=2", "StartLimitIntervalSec=600", "StartLimitBurst=5"):
        assert line in unit, line
    sysusers = [line.split() for line in (REPO / "systemd" / "edge-agent.sysusers").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert sysusers[0][:2] == ["u", "edge-agent"] and ["m", "edge-agent", "audio"] in sysusers


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = (REPO / "systemd" / "edge-agent.service").read_text()
    # verify checks that ExecStart exists: point it at this venv's entry point
    exe = shutil.which("edge-agent") or str(Path(__import__("sys").executable).with_name("edge-agent"))
    if not Path(exe).exists():
        pytest.skip("the edge-agent console script is not installed")
    target = tmp_path / "edge-agent.service"
    target.write_text(unit.replace("/opt/edge-asd/.venv/bin/edge-agent", exe))
    result = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in result.stderr.splitlines() if "edge-agent.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
