"""MemMixup adds points to a bank's target memory, not to its densities: the normalizers' statistics of a mixed
bank are those of its raw refs (ld, ld-domain) or are measured outside each row's group (zscore-domain), and a
bank stored with the statistics of an older release is fitted and calibrated again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.model_info import MemberModel
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.bank_set import load_banks
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.enrollment import enroll
from edge_agent.scoring.normalizers import ZScoreDomain
from edge_agent.scoring.scorer import BankScorer

from .configs import knn_only
from .conftest import clustered_points, make_info

DIM = 24


def _banks(seed: int = 0, target: int = 8) -> tuple[MemoryBank, MemoryBank]:
    rng = np.random.default_rng(seed)
    info = make_info({"layer_1": DIM})
    source = clustered_points(rng, 60, DIM)
    raw_target = clustered_points(rng, target, DIM) + 2.0
    plain = MemoryBank(info, {"source": {"layer_1": source}, "target": {"layer_1": raw_target}})
    return plain, plain.with_memmixup(lam=0.9, k=5)


@pytest.mark.parametrize("normalizer", ["ld-domain", "ld"])
def test_local_densities_of_a_mixed_bank_are_those_of_its_raw_refs(normalizer: str) -> None:
    plain, mixed = _banks()
    groups = mixed.target_groups("layer_1")
    assert mixed.count("target") == 8 * 6 and groups.tolist()[:8] == list(range(8))
    b_plain = BankScorer.fit(plain, knn_only(normalizer=normalizer)).normalizers["layer_1"]
    b_mixed = BankScorer.fit(mixed, knn_only(normalizer=normalizer)).normalizers["layer_1"]
    np.testing.assert_allclose(b_mixed.b_source, b_plain.b_source, rtol=1e-12)  # type: ignore[attr-defined]
    # every target row, raw or mixed, has its raw ref's density
    np.testing.assert_allclose(b_mixed.b_target, b_plain.b_target[groups], rtol=1e-12)  # type: ignore[attr-defined]


def test_with_the_same_densities_the_mixes_can_only_lower_a_score() -> None:
    """min over a superset of refs with unchanged b: no query scores higher for the mixes (ld-domain), and the
    target-domain queries near the mixes score lower."""
    plain, mixed = _banks(seed=1)
    rng = np.random.default_rng(7)
    queries = np.concatenate([clustered_points(rng, 30, DIM), clustered_points(rng, 30, DIM) + 2.0])
    with_mix = BankScorer.fit(mixed, knn_only()).score({"layer_1": queries})
    without = BankScorer.fit(plain, knn_only()).score({"layer_1": queries})
    assert np.all(with_mix <= without * (1 + 1e-9))
    assert np.any(with_mix < without * (1 - 1e-3))


def test_zscore_domain_measures_each_target_row_outside_its_group() -> None:
    plain, mixed = _banks(seed=2)
    norm = BankScorer.fit(mixed, knn_only(normalizer="zscore-domain", k_n=1)).normalizers["layer_1"]
    assert isinstance(norm, ZScoreDomain)
    rows = mixed.get("layer_1", "target").astype(np.float64)
    groups = mixed.target_groups("layer_1")
    dist = np.linalg.norm(rows[:, None] - rows[None], axis=2)
    dist[groups[:, None] == groups[None, :]] = np.inf  # a row, its raw ref and that ref's other mixes
    loo = dist.min(axis=1)
    assert norm.mu_target == pytest.approx(float(loo.mean()), rel=1e-5)
    assert norm.sigma_from == "target" and norm.sigma == pytest.approx(float(loo.std()), rel=1e-4)
    # two raw target refs with their mixes are still two refs: below sigma_min_target the fallback applies
    two = MemoryBank(plain.info, {"source": {"layer_1": plain.get("layer_1", "source")},
                                  "target": {"layer_1": plain.get("layer_1", "target")[:2]}}).with_memmixup()
    small = BankScorer.fit(two, knn_only(normalizer="zscore-domain")).normalizers["layer_1"]
    assert isinstance(small, ZScoreDomain) and small.sigma_from == "pooled"


def test_one_raw_target_ref_with_its_mixes_measures_its_density_against_the_source() -> None:
    plain, _ = _banks(seed=3)
    one = MemoryBank(plain.info, {"source": {"layer_1": plain.get("layer_1", "source")},
                                  "target": {"layer_1": plain.get("layer_1", "target")[:1]}}).with_memmixup()
    scorer = BankScorer.fit(one, knn_only())
    b_target = scorer.normalizers["layer_1"].b_target  # type: ignore[attr-defined]
    assert b_target.shape == (6,) and np.all(np.isfinite(b_target)) and np.all(b_target > 0)
    assert np.all(np.isfinite(scorer.loo_scores()))


def test_a_mixed_bank_stored_by_an_older_release_is_fitted_and_calibrated_again(tmp_path: Path) -> None:
    _, mixed = _banks(seed=4)
    member = MemberModel(mixed.info, "model-sha", "m-0123")
    raw = {d: {"layer_1": mixed.get_raw("layer_1", d)} for d in ("source", "target")}
    cfg = ScoringConfig()
    enroll(tmp_path / "bank", [member], [raw], mixed.names, cfg, mixup=mixed.mixup)
    path = tmp_path / "bank" / "bank.json"
    current = load_banks(tmp_path / "bank", [member])
    assert current.threshold_mismatch(cfg, [("layer_1",)]) is None
    # the same bank as a release before this change wrote it: scorer state version 1, other target densities
    doc = json.loads(path.read_text())
    state = doc["scorer_state"]
    state["version"] = 1
    b_target = state["layers"]["layer_1"]["stats"]["b_target"]
    state["layers"]["layer_1"]["stats"]["b_target"] = [v / 10 for v in b_target]
    path.write_text(json.dumps(doc))
    old = load_banks(tmp_path / "bank", [member])
    cause = old.threshold_mismatch(cfg, [("layer_1",)])
    assert cause is not None and "version 1" in cause
    refit = BankScorer.fit(old.banks[0], cfg).normalizers["layer_1"]
    np.testing.assert_allclose(refit.b_target, b_target, rtol=1e-9)  # type: ignore[attr-defined]
