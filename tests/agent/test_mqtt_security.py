"""TLS with a private CA and username/password (from a file, or the environment), last will on a crash."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from .agent_helpers import BASE, Mosquitto, Watcher, make_pki, start_agent, write_anomaly_wav, write_config


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None,
                    reason="openssl or mosquitto_passwd is not installed")
@pytest.mark.parametrize("secret", ["password_file", "password_env"])
def test_tls_and_password_from_file_or_env(tmp_path: Path, toy_model: Path, bank_dir: Path, secret: str) -> None:
    make_pki(tmp_path)
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(tmp_path / "passwd"), "agent", "s3cret"], check=True,
                   capture_output=True, timeout=30)
    (tmp_path / "passwd").chmod(0o600)
    broker = Mosquitto(tmp_path, f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
                                 f"cafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\n"
                                 f"keyfile {tmp_path / 'server.key'}\n")
    broker.start()
    (tmp_path / "pw").write_text("s3cret\n")
    source = "password_file: pw" if secret == "password_file" else "password_env: EDGE_TEST_MQTT_PW"
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10,
                       mqtt_extra=f"  username: agent\n  {source}\n  tls: {{ca_file: ca.pem}}")
    cfg.write_text(cfg.read_text().replace("host: 127.0.0.1", "host: localhost"))

    def secure(client: paho.Client) -> None:
        client.username_pw_set("agent", "s3cret")
        client.tls_set(ca_certs=str(tmp_path / "ca.pem"), tls_version=ssl.PROTOCOL_TLS_CLIENT)

    watcher = Watcher(broker.port, f"{BASE}/#", setup=secure)
    env_before = os.environ.get("EDGE_TEST_MQTT_PW")
    os.environ["EDGE_TEST_MQTT_PW"] = "s3cret"
    log = tmp_path / "agent.log"
    try:
        proc = start_agent(cfg, log)
    finally:
        if env_before is None:
            os.environ.pop("EDGE_TEST_MQTT_PW")
    try:
        watcher.wait_for(lambda m: any(p["type"] == "new" for p in watcher.on(f"{BASE}/fan/alert")),
                         what="an alert over TLS with a password")
        assert "online" in watcher.on(f"{BASE}/status")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        watcher.close()
        broker.stop()
    assert "s3cret" not in log.read_text()


def test_crash_leaves_retained_offline_by_last_will(tmp_path: Path, toy_model: Path, bank_dir: Path,
                                                    broker: Mosquitto, watcher: Watcher) -> None:
    wav = write_anomaly_wav(tmp_path / "fan.wav", 10, (4, 6))
    cfg = write_config(tmp_path, toy_model, bank_dir, broker.port, wav, realtime=True, loop=True, speed=10)
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    watcher.wait_for(lambda m: "online" in watcher.on(f"{BASE}/status"), what="online")
    proc.kill()
    proc.wait(10)
    watcher.wait_for(lambda m: watcher.on(f"{BASE}/status")[-1:] == ["offline"], what="the last will")
    late = Watcher(broker.port, f"{BASE}/status")
    try:
        got = late.wait_for(lambda m: bool(m), what="retained status")
        assert got[0][1:] == ("offline", True)
    finally:
        late.close()
