"""`edge-agent fleet keygen` and signed pushes, to a fourth real agent that pins the public key in
fleet.trusted_keys; then that agent stops on SIGTERM and `fleet status` shows it stopped."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Rig, one_line_error

NODE = "secure-1"


@pytest.fixture(scope="module")
def signing(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(the private key file, the public key) from `fleet keygen`, and NODE running, pinning that key."""
    out = tmp_path_factory.mktemp("keys") / "fleet"
    result = rig.cli("keygen", "--out", str(out), connect=False)
    assert result.returncode == 0, result.stderr
    public = result.stdout.splitlines()[0]
    rig.start(NODE, groups=(), trusted_keys=(public,))
    try:
        rig.wait_online(NODE)
        yield out / "fleet-signing.pem", public
    finally:
        if NODE in rig.procs:
            rig.stop(NODE)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites_it(
        rig: Rig, signing: tuple[Path, str]) -> None:
    key, public = signing
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert len(public) == 44 and public.endswith("=")
    before = key.read_bytes()
    again = one_line_error(rig.cli("keygen", "--out", str(key.parent), connect=False))
    assert "exists" in again and str(key) in again
    assert key.read_bytes() == before


def test_a_signed_push_commits_and_the_same_push_unsigned_is_refused(rig: Rig, signing: tuple[Path, str],
                                                                     tmp_path: Path) -> None:
    key, _ = signing
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("sources:\n  fan: {threshold: 7.5}\n")
    signed = rig.cli("push", str(overlay), "--node", NODE, "--sign-key", str(key), "--wait", "30", "--json")
    assert signed.returncode == 0, (signed.stdout, signed.stderr)
    (row,) = json.loads(signed.stdout)
    assert row["node"] == NODE and row["wave"] == "node" and row["result"] == "committed"
    version = row["version"]
    rig.watcher.wait_for(lambda m: rig.last_state(NODE)["config"]["committed_version"] == version
                         and rig.last_state(NODE)["sources"][0]["threshold"] == 7.5, timeout=10,
                         what=f"{NODE} reporting the signed version")

    unsigned = rig.cli("push", str(overlay), "--node", NODE, "--wait", "30", "--json")
    assert unsigned.returncode == 1, (unsigned.stdout, unsigned.stderr)
    (row,) = json.loads(unsigned.stdout)
    assert row["result"] == "refused" and row["version"] == version + 1
    assert row["error"].startswith("signature:") and "not signed" in row["error"]
    text = rig.cli("push", str(overlay), "--node", NODE, "--wait", "30")  # the table says the same
    assert text.returncode == 1 and "refused" in text.stdout.splitlines()[1]


def test_status_shows_a_node_stopped_by_sigterm(rig: Rig, signing: tuple[Path, str]) -> None:
    rows = {r["node"]: r for r in json.loads(rig.cli("status", "--json", "--settle", "0.5").stdout)}
    assert rows[NODE]["status"] == "online" and rows[NODE]["groups"] == []
    rig.stop(NODE)  # SIGTERM, exit 0
    result = rig.cli("status", "--json", "--settle", "0.5")
    assert result.returncode == 0, result.stderr
    rows = {r["node"]: r for r in json.loads(result.stdout)}
    assert rows[NODE]["status"] == "stopped"
    assert all(rows[n]["status"] == "online" for n in ("line-a", "line-b", "line-c"))
    table = rig.cli("status", "--settle", "0.5")
    (line,) = [x for x in table.stdout.splitlines() if x.startswith(NODE)]
    assert line.split()[1] == "stopped"
