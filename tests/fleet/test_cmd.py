"""`edge-agent fleet cmd` to every node ($broadcast), a group and one node; a refused command is exit 1."""

from __future__ import annotations

import json

from .conftest import GROUP, NODES, PREFIX, Rig


def _non_retained_states(rig: Rig, node: str) -> int:
    return sum(1 for t, _, retained in rig.watcher.messages if t == f"{PREFIX}/{node}/state" and not retained)


def test_status_to_all_is_answered_by_every_node_which_republishes_its_state(rig: Rig) -> None:
    quiet = [n for n in NODES if n != "line-c"]  # line-c's episodes change its state every second anyway
    before = {n: _non_retained_states(rig, n) for n in quiet}
    result = rig.cli("cmd", "status", "--all", "--json", "--wait", "10", "--settle", "0.5")
    assert result.returncode == 0, (result.stdout, result.stderr)
    rows = {r["node"]: r for r in json.loads(result.stdout)}
    assert set(NODES) <= set(rows)
    for node in NODES:
        assert rows[node]["ok"] is True and rows[node]["expected"] is True and rows[node]["error"] is None
        assert rows[node]["result"]["node"] == node and rows[node]["result"]["fleet"]["groups"] == [GROUP]
    rig.watcher.wait_for(lambda m: all(_non_retained_states(rig, n) > before[n] for n in quiet), timeout=10,
                         what="the state re-published after the status command")

    text = rig.cli("cmd", "status", "--group", GROUP, "--wait", "10", "--settle", "0.5")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["NODE", "OK", "SECONDS", "RESULT"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(NODES)
    assert all(line.split()[1] == "yes" and "status=online" in line for line in lines[1:]), lines


def test_a_refused_command_is_reported_with_its_error(rig: Rig) -> None:
    result = rig.cli("cmd", "acknowledge", "--node", "line-a", "--args", '{"what": "nothing"}', "--json")
    assert result.returncode == 1, (result.stdout, result.stderr)
    (row,) = json.loads(result.stdout)
    assert row["node"] == "line-a" and row["ok"] is False and "what" in row["error"]
    # a node that is not there does not answer
    missing = rig.cli("cmd", "status", "--node", "nobody", "--wait", "1")
    assert missing.returncode == 1 and "no answer" in missing.stdout and "nobody" in missing.stderr
    bad = rig.cli("cmd", "status", "--all", "--args", "[1]")
    assert bad.returncode == 2 and bad.stderr.startswith("edge-agent fleet: error: --args")
