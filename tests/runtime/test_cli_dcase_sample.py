"""The real DCASE clips in ../shared go through enroll and score (CLI) with the real mn04 weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edge_agent.cli import main


@pytest.mark.parametrize("machine", ["fan", "ToyCar", "valve"])
def test_enroll_and_score_real_clips(machine: str, dcase_sample: Path, mn04_real_onnx: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bank = tmp_path / "bank"
    assert main(["enroll", "--model", str(mn04_real_onnx), "--bank", str(bank),
                 "--train", str(dcase_sample / machine / "train"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["source_refs"] == 2 and summary["target_refs"] == 0
    assert main(["score", "--model", str(mn04_real_onnx), "--bank", str(bank),
                 str(dcase_sample / machine / "test")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # two refs: the standardized fusion's scores are z-units around the refs' own, of either sign
    assert len(rows) == 2 and all(math.isfinite(r["score"]) and math.isfinite(r["threshold"]) for r in rows)
    assert rows[0]["score"] != rows[1]["score"]
