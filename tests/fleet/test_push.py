"""`edge-agent fleet push` to three real agents: a canary wave then the group, the next version chosen by itself,
an equal version ignored by the nodes (no answer), and an overlay the node would refuse: refused before anything
is published."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from ..agent.agent_helpers import Watcher
from .conftest import GROUP, NODES, PREFIX, Rig, one_line_error


def _overlay(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    rows = json.loads(result.stdout)
    assert isinstance(rows, list), result.stdout
    return rows


def _retained(rig: Rig, pattern: str) -> dict[str, Any]:
    """The retained messages on `pattern` now, read by a fresh subscriber."""
    watcher = Watcher(rig.port, pattern)
    try:
        time.sleep(0.5)
        return {t: p for t, p, retained in watcher.messages if retained}
    finally:
        watcher.close()


def _threshold(state: dict[str, Any]) -> float:
    return float(state["sources"][0]["threshold"])


def _current_version(rig: Rig) -> int:
    """The highest version the group's nodes report or its retained documents carry."""
    versions = [0]
    for node in NODES:
        config = rig.last_state(node)["config"]
        versions += [v for v in (config.get("version"), config.get("committed_version")) if isinstance(v, int)]
    for topic, doc in _retained(rig, f"{PREFIX}/+/config/desired").items():
        if topic.split("/")[1] in NODES:
            versions.append(doc["version"])
    for doc in _retained(rig, f"{PREFIX}/group/{GROUP}/config/desired").values():
        versions.append(doc["version"])
    return max(versions)


def _wait_reports(rig: Rig, version: int, threshold: float) -> None:
    for node in NODES:
        rig.watcher.wait_for(
            lambda m, n=node: rig.last_state(n)["config"]["version"] == version
            and rig.last_state(n)["config"]["status"] == "committed" and _threshold(rig.last_state(n)) == threshold,
            timeout=15, what=f"{node} reporting version {version} committed with threshold {threshold}")


def test_canary_then_group_push_commits_everywhere(rig: Rig, tmp_path: Path) -> None:
    overlay = _overlay(tmp_path, "threshold.yaml", "sources:\n  '*': {threshold: 5.0}\n")
    before = _current_version(rig)
    started = time.monotonic()
    result = rig.cli("push", str(overlay), "--group", GROUP, "--canary", "1", "--wait", "60", "--json",
                     "--id", "canary-test", timeout=200)
    wall = time.monotonic() - started
    assert result.returncode == 0, (result.stdout, result.stderr)
    rows = _rows(result)
    version = before + 1
    assert sorted(r["node"] for r in rows) == sorted(NODES)
    assert all(r["result"] == "committed" and r["version"] == version and r["error"] is None for r in rows), rows
    canaries = [r for r in rows if r["wave"] == "canary"]
    assert [r["node"] for r in canaries] == ["line-a"], "one canary: online nodes by name"
    assert canaries[0]["origin"] == "node"
    assert all(r["wave"] == "group" and r["origin"] == f"group/{GROUP}" for r in rows if r["wave"] != "canary"), rows

    # the canary got it on its node topic, the group document followed with the same version
    desired = _retained(rig, f"{PREFIX}/+/config/desired")
    node_doc = desired[f"{PREFIX}/line-a/config/desired"]
    assert node_doc["version"] == version and node_doc["target"] == "node/line-a" and node_doc["id"] == "canary-test"
    assert node_doc["config"] == {"sources": {"*": {"threshold": 5.0}}}
    assert f"{PREFIX}/line-b/config/desired" not in desired or desired[f"{PREFIX}/line-b/config/desired"][
        "version"] < version
    group_doc = _retained(rig, f"{PREFIX}/group/{GROUP}/config/desired")[f"{PREFIX}/group/{GROUP}/config/desired"]
    assert group_doc["version"] == version and group_doc["target"] == f"group/{GROUP}"
    # the canary published before the group: the watcher saw its node document first
    ours = {f"{PREFIX}/{n}/config/desired" for n in NODES} | {f"{PREFIX}/group/{GROUP}/config/desired"}
    order = [t for t, p, r in rig.watcher.messages if t in ours and not r and isinstance(p, dict)
             and p.get("version") == version]
    assert order == [f"{PREFIX}/line-a/config/desired", f"{PREFIX}/group/{GROUP}/config/desired"], order
    # the canary answered once: the group document at the same version did not reach it again
    time.sleep(0.5)
    answers = [p for p in rig.watcher.on(f"{PREFIX}/line-a/config/result") if p.get("version") == version]
    assert len(answers) == 1 and answers[0]["origin"] == "node"

    _wait_reports(rig, version, 5.0)
    assert rig.last_state("line-a")["config"]["desired_origin"] == "node"
    assert all(rig.last_state(n)["config"]["desired_origin"] == f"group/{GROUP}" for n in ("line-b", "line-c"))
    assert all(rig.last_state(n)["config"]["committed_version"] == version for n in NODES)

    measured = re.search(r"([0-9.]+) s from the first publish to the last answer", result.stderr)
    assert measured, result.stderr
    print(f"\n[fleet] canary push to {len(NODES)} nodes (1 canary + 2): {measured.group(1)} s from the first "
          f"publish to the last commit ({wall:.2f} s wall for the whole CLI run)")


def test_next_version_is_picked_and_an_equal_version_gets_no_answer(rig: Rig, tmp_path: Path) -> None:
    before = _current_version(rig)
    overlay = _overlay(tmp_path, "threshold4.json", json.dumps({"sources": {"*": {"threshold": 4.0}}}))
    result = rig.cli("push", str(overlay), "--group", GROUP, "--wait", "60", "--json", timeout=200)
    assert result.returncode == 0, (result.stdout, result.stderr)
    rows = _rows(result)
    assert sorted(r["node"] for r in rows) == sorted(NODES)
    assert all(r["version"] == before + 1 and r["result"] == "committed" and r["wave"] == "group" for r in rows)
    _wait_reports(rig, before + 1, 4.0)

    # the same version again (other content): every node ignores it, so nobody answers
    same = _overlay(tmp_path, "threshold3.yaml", "sources: {'*': {threshold: 3.0}}\n")
    result = rig.cli("push", str(same), "--group", GROUP, "--version", str(before + 1), "--wait", "2")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"is not above version {before + 1}" in result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(lines) == set(NODES)
    assert all("no answer" in line for line in lines.values()), result.stdout
    for node in NODES:
        assert "event=desired_ignored" in rig.log(node).read_text()
        assert _threshold(rig.last_state(node)) == 4.0


def test_an_overlay_the_node_would_refuse_is_refused_before_anything_is_published(rig: Rig, tmp_path: Path) -> None:
    watcher = Watcher(rig.port, f"{PREFIX}/#")
    try:
        time.sleep(0.5)  # the retained messages arrive first
        mark = len(watcher.messages)
        cases = {"mqtt.yaml": ("mqtt: {host: x}\n", "config.mqtt"),
                 "device.yaml": ("sources: {'*': {device: 'hw:1'}}\n", "config.sources.*.device"),
                 "type.yaml": ("sources: {fan: {threshold: high}}\n", "config.sources.fan.threshold")}
        for name, (text, path) in cases.items():
            overlay = _overlay(tmp_path, name, text)
            for target in (["--group", GROUP], ["--node", "line-a", "--canary", "1"], ["--node", "line-b"]):
                result = rig.cli("push", str(overlay), *target, "--wait", "5")
                error = one_line_error(result)
                assert f"{path}:" in error and str(overlay) in error, error
                assert result.stdout == ""
        missing = one_line_error(rig.cli("push", str(tmp_path / "nope.yaml"), "--group", GROUP))
        assert "nope.yaml" in missing
        key = tmp_path / "not-a-key.pem"
        key.write_text("hello\n")
        valid = _overlay(tmp_path, "ok.yaml", "sources: {}\n")
        bad_key = one_line_error(rig.cli("push", str(valid), "--group", GROUP, "--sign-key", str(key)))
        assert "--sign-key" in bad_key
        canary_node = one_line_error(rig.cli("push", str(valid), "--node", "line-a", "--canary", "1"))
        assert "--canary needs --group" in canary_node
        time.sleep(0.5)
        published = [t for t, _, _ in watcher.messages[mark:] if "/config/" in t or "/cmd/" in t]
        assert published == [], published
    finally:
        watcher.close()


def test_a_canary_that_refuses_stops_the_rollout_before_the_group_document(rig: Rig, tmp_path: Path) -> None:
    group_topic = f"{PREFIX}/group/{GROUP}/config/desired"
    group_before = _retained(rig, group_topic).get(group_topic)
    thresholds = {n: _threshold(rig.last_state(n)) for n in NODES}
    before = _current_version(rig)
    # valid for the overlay check, refused by the node: the bank is outside its push roots
    overlay = _overlay(tmp_path, "bank.yaml", "sources: {fan: {bank: /nonexistent/bank}}\n")
    result = rig.cli("push", str(overlay), "--group", GROUP, "--canary", "1", "--wait", "30", "--json")
    assert result.returncode == 1, (result.stdout, result.stderr)
    rows = {r["node"]: r for r in _rows(result)}
    assert rows["line-a"]["wave"] == "canary" and rows["line-a"]["result"] == "refused"
    assert "sources" in rows["line-a"]["error"] and rows["line-a"]["version"] == before + 1
    assert all(rows[n]["result"] == "not pushed" and rows[n]["wave"] == "group" for n in ("line-b", "line-c"))
    assert "the group document (version" in result.stderr and "was not published" in result.stderr
    time.sleep(0.5)
    assert _retained(rig, group_topic).get(group_topic) == group_before, "the group document must not change"
    assert not [p for t, p, r in rig.watcher.messages if t == group_topic and not r and p.get("version") == before + 1]
    assert {n: _threshold(rig.last_state(n)) for n in NODES} == thresholds
