"""`edge-agent fleet status` against three real agents: the table, --group, --json, a malformed state, and
connection errors (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ..agent.agent_helpers import Mosquitto, make_pki
from .conftest import GROUP, NODES, PREFIX, Rig, one_line_error


def _rows(result: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return {r["node"]: r for r in rows}


def test_status_lists_every_node_with_what_it_reports(rig: Rig) -> None:
    rows = _rows(rig.cli("status", "--json", "--settle", "0.5"))
    assert set(NODES) <= set(rows), rows
    assert [n for n in rows] == sorted(rows), "rows are sorted by node"
    model_id = rig.last_state(NODES[0])["model"]["id"]
    for node in NODES:
        row = rows[node]
        assert row["status"] == "online"
        assert row["groups"] == [GROUP]
        assert row["health"] == "ok"
        assert row["model"]["id"] == model_id
        assert [b["source"] for b in row["banks"]] == ["fan"] and row["banks"][0]["id"]
        assert isinstance(row["spool_pending"], int)
        assert row["problems"] == []

    table = rig.cli("status", "--settle", "0.5")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["NODE", "STATUS", "GROUPS"]
    for node in NODES:
        (line,) = [x for x in lines if x.split()[0] == node]
        assert line.split()[1:3] == ["online", GROUP] and model_id in line, line

    other = rig.cli("status", "--json", "--group", "other", "--settle", "0.5")
    assert other.returncode == 0 and json.loads(other.stdout) == []
    mine = _rows(rig.cli("status", "--json", "--group", GROUP, "--settle", "0.5"))
    assert set(mine) == set(NODES)


def test_a_malformed_state_shows_as_question_marks_and_is_named(rig: Rig) -> None:
    rig.publish(f"{PREFIX}/broken-1/state", b"{not json", retain=True)
    rig.publish(f"{PREFIX}/broken-2/state", json.dumps({"status": 3, "fleet": {"groups": "line-1"}, "model": [],
                                                        "sources": [{"name": "x", "episode": 7}], "health": "ok",
                                                        "spool": {"pending": "many"}}), retain=True)
    try:
        result = rig.cli("status", "--json", "--settle", "0.5")
        rows = _rows(result)
        assert set(NODES) <= set(rows)
        assert rows["broken-1"]["groups"] == "?" and rows["broken-1"]["health"] == "?"
        assert rows["broken-1"]["problems"] and "not JSON" in rows["broken-1"]["problems"][0]
        b2 = rows["broken-2"]
        assert b2["groups"] == "?" and b2["model"] == "?" and b2["spool_pending"] == "?" and b2["health"] == "ok"
        assert b2["open_episodes"] == ["x=?"]
        assert "node broken-1: malformed state" in result.stderr and "node broken-2: malformed state" in result.stderr
        table = rig.cli("status", "--settle", "0.5")
        assert table.returncode == 0
        (line,) = [x for x in table.stdout.splitlines() if x.startswith("broken-1")]
        assert "?" in line
        # a node with a malformed state is in no group
        assert json.loads(rig.cli("status", "--json", "--group", GROUP, "--settle", "0.5").stdout) != []
        assert "broken-2" not in {r["node"] for r in json.loads(
            rig.cli("status", "--json", "--group", GROUP, "--settle", "0.5").stdout)}
    finally:
        for node in ("broken-1", "broken-2"):
            rig.publish(f"{PREFIX}/{node}/state", b"", retain=True)


def test_connection_errors_are_one_line_naming_the_cause(rig: Rig, tmp_path: Path) -> None:
    closed = Mosquitto(tmp_path)  # a port nothing listens on (never started)
    error = one_line_error(rig.cli("status", "--host", "127.0.0.1", "--port", str(closed.port), connect=False))
    assert "connection refused" in error and f"127.0.0.1:{closed.port}" in error
    error = one_line_error(rig.cli("status", "--ca-file", str(tmp_path / "missing.pem")))
    assert "--ca-file" in error and "missing.pem" in error
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    error = one_line_error(rig.cli("status", "--ca-file", str(tmp_path / "bad.pem")))
    assert "--ca-file" in error and "PEM" in error
    config = tmp_path / "agent.yaml"
    config.write_text("node: x\nmqtt: {host: 127.0.0.1, port: 70000}\n")
    error = one_line_error(rig.cli("status", "--config", str(config), connect=False))
    assert "mqtt.port" in error and str(config) in error
    # the flags override the file
    config.write_text(f"node: x\nmqtt: {{host: 127.0.0.1, port: {closed.port}, prefix: {PREFIX}}}\n")
    assert rig.cli("status", "--config", str(config), "--port", str(rig.port), "--json", "--settle", "0.3",
                   connect=False).returncode == 0
    error = one_line_error(rig.cli("status", "--config", str(config), connect=False))
    assert "connection refused" in error


def test_refused_credentials_are_one_line(rig: Rig, tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("operator:right\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, capture_output=True, timeout=30)
    passwd.chmod(0o600)
    secured = Mosquitto(tmp_path, f"allow_anonymous false\npassword_file {passwd}\n")
    secured.start()
    try:
        (tmp_path / "pw").write_text("wrong\n")
        error = one_line_error(rig.cli("status", "--host", "127.0.0.1", "--port", str(secured.port), "--username",
                                       "operator", "--password-file", str(tmp_path / "pw"), connect=False))
        assert "refused the connection" in error and "authorized" in error.lower()
        (tmp_path / "pw").write_text("right\n")
        ok = rig.cli("status", "--host", "127.0.0.1", "--port", str(secured.port), "--username", "operator",
                     "--password-file", str(tmp_path / "pw"), "--json", "--settle", "0.2", connect=False)
        assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stderr
        error = one_line_error(rig.cli("status", "--host", "127.0.0.1", "--port", str(secured.port), "--username",
                                       "operator", "--password-env", "EDGE_FLEET_TEST_UNSET", connect=False))
        assert "--password-env" in error
    finally:
        secured.stop()


def test_tls_with_a_password_from_the_agent_config_file(rig: Rig, tmp_path: Path) -> None:
    """The same TLS and credential options as the agent: the mqtt section of an agent config works as it is."""
    make_pki(tmp_path)
    passwd = tmp_path / "passwd"
    passwd.write_text("operator:s3cret\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, capture_output=True, timeout=30)
    passwd.chmod(0o600)
    secured = Mosquitto(tmp_path, f"allow_anonymous false\npassword_file {passwd}\ncafile {tmp_path / 'ca.pem'}\n"
                                  f"certfile {tmp_path / 'server.pem'}\nkeyfile {tmp_path / 'server.key'}\n")
    secured.start()
    try:
        (tmp_path / "pw").write_text("s3cret\n")
        config = tmp_path / "agent.yaml"
        config.write_text(f"node: x\nmqtt: {{host: localhost, port: {secured.port}, username: operator, "
                          "password_file: pw, tls: {ca_file: ca.pem}, client_id: the-agents-own}\n")
        ok = rig.cli("status", "--config", str(config), "--json", "--settle", "0.2", connect=False)
        assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stderr
        # another CA does not trust the broker's certificate: one line naming the cause
        (tmp_path / "other").mkdir()
        make_pki(tmp_path / "other")
        error = one_line_error(rig.cli("status", "--host", "localhost", "--port", str(secured.port), "--ca-file",
                                       str(tmp_path / "other" / "ca.pem"), "--username", "operator",
                                       "--password-file", str(tmp_path / "pw"), connect=False))
        assert f"localhost:{secured.port}" in error and "certificate" in error.lower(), error
    finally:
        secured.stop()
