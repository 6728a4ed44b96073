"""Why the broker cannot be reached, named once per change (real mosquitto brokers, real TLS), and TLS
files that do not load refused at start with one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edge_agent.agent.config import MqttConfig, TlsConfig
from edge_agent.agent.connection import diagnose, tls_context
from edge_agent.errors import ConfigError

from .agent_helpers import (
    REPO,
    Mosquitto,
    agent_command,
    free_port,
    make_pki,
    start_agent,
    stop_agent,
    wait_for_log,
    write_anomaly_wav,
    write_config,
)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    make_pki(tmp_path)
    return tmp_path


def _tls_broker(workdir: Path, pki: Path, extra: str = "allow_anonymous true\n") -> Mosquitto:
    return Mosquitto(workdir, f"{extra}cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\n"
                              f"keyfile {pki / 'server.key'}\n")


def test_diagnose_names_the_cause(tmp_path: Path, pki: Path, broker: Mosquitto) -> None:
    ctx = tls_context(TlsConfig(ca_file=pki / "ca.pem"))
    assert "refused" in diagnose(MqttConfig(host="127.0.0.1", port=free_port()), None)
    assert "host not found" in diagnose(MqttConfig(host="no-such-broker.invalid", port=1883), None)
    assert "does not speak TLS" in diagnose(MqttConfig(host="127.0.0.1", port=broker.port), ctx)
    other = tmp_path / "other"
    other.mkdir()
    make_pki(other, names="DNS:broker.example")  # a valid chain, for another name
    (tmp_path / "tls").mkdir()
    tls = _tls_broker(tmp_path / "tls", other)
    tls.start()
    try:
        named = tls_context(TlsConfig(ca_file=other / "ca.pem"))
        assert "does not name 127.0.0.1" in diagnose(MqttConfig(host="127.0.0.1", port=tls.port), named)
        assert "verification failed" in diagnose(MqttConfig(host="127.0.0.1", port=tls.port), ctx)  # other CA
        insecure = tls_context(TlsConfig(ca_file=other / "ca.pem", insecure=True))
        assert "TLS works" in diagnose(MqttConfig(host="127.0.0.1", port=tls.port), insecure)
    finally:
        tls.stop()


def test_tls_files_that_do_not_load_are_config_errors(tmp_path: Path, pki: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        tls_context(TlsConfig(ca_file=tmp_path / "junk.pem"))
    assert info.value.path == "mqtt.tls.ca_file"
    with pytest.raises(ConfigError) as info:
        tls_context(TlsConfig(ca_file=pki / "ca.pem", cert_file=pki / "server.pem", key_file=pki / "ca.key"))
    assert info.value.path == "mqtt.tls.cert_file"


def test_a_bad_ca_file_at_start_is_one_line_and_exit_2(tmp_path: Path, toy_model: Path, bank_dir: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    wav = write_anomaly_wav(tmp_path / "fan.wav", 4, (1, 2))
    cfg = write_config(tmp_path, toy_model, bank_dir, free_port(), wav, realtime=True, loop=True,
                       mqtt_extra="  tls: {ca_file: junk.pem}")
    result = subprocess.run(agent_command(cfg), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edge-agent: error: ") and "mqtt.tls.ca_file" in lines[0], lines


def test_tls_against_a_plain_port_is_logged_once_with_its_cause(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                                pki: Path, broker: Mosquitto) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10,
                       mqtt_extra=f"  tls: {{ca_file: {pki / 'ca.pem'}}}")
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    try:
        wait_for_log(log, lambda text: "event=mqtt_unreachable" in text, what="the diagnosed cause")
        # the broker sees every reconnect attempt (1 s apart); after four, the cause is still logged once
        wait_for_log(broker.log, lambda text: text.count("New connection from") >= 4, what="four reconnects")
        assert proc.poll() is None
    finally:
        assert stop_agent(proc, log) == 0
    text = log.read_text()
    causes = [line for line in text.splitlines() if "event=mqtt_unreachable" in line]
    assert len(causes) == 1 and "does not speak TLS" in causes[0], causes
    assert "Client is not connected" not in text


def test_wrong_credentials_are_named_in_the_log(tmp_path: Path, toy_model: Path, bank_dir: Path) -> None:
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(tmp_path / "passwd"), "agent", "right"], check=True,
                   capture_output=True, timeout=30)
    (tmp_path / "passwd").chmod(0o600)
    broker = Mosquitto(tmp_path, f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}\n")
    broker.start()
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10,
                       mqtt_extra="  username: agent\n  password: wrong-secret")
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    try:
        text = wait_for_log(log, lambda t: "event=mqtt_unreachable" in t, what="the refusal")
        assert "refused by the broker" in text
    finally:
        assert stop_agent(proc, log) == 0
        broker.stop()
    assert "wrong-secret" not in log.read_text()
