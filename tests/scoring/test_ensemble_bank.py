"""Ensemble banks on disk: round trip, member matching in any order, validation, atomic replacement."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import BankError, ModelMismatchError
from edge_agent.model_info import MemberModel, ModelInfo
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.bank_set import ENSEMBLE_JSON, BankSet, load_banks
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.enrollment import enroll
from edge_agent.scoring.scorer import BankScorer, Scorer


def _member(variant: str, rate: int, dim: int, sha: str) -> MemberModel:
    info = ModelInfo(family="toy", variant=variant, sample_rate=rate, window_samples=rate,
                     layers=("layer_1", "layer_2"), dims=(dim, dim), default_layers=("layer_1", "layer_2"),
                     checkpoint_sha256=sha * 32, exporter_version="test")
    return MemberModel(info, sha * 32, f"{variant}-{(sha * 6)[:12]}")


MEMBERS = [_member("a", 8000, 8, "aa"), _member("b", 16000, 12, "bb")]


def _embeddings(seed: int, n_source: int = 30, n_target: int = 4) -> list[dict[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    out = []
    for m in MEMBERS:
        dim = m.info.dims[0]
        out.append({"source": {layer: rng.normal(size=(n_source, dim)).astype(np.float32) for layer in m.info.layers},
                    "target": {layer: rng.normal(1.0, 1.0, size=(n_target, dim)).astype(np.float32)
                               for layer in m.info.layers}})
    return out


def _names(n_source: int = 30, n_target: int = 4) -> dict[str, list[str]]:
    return {"source": [f"s{i}" for i in range(n_source)], "target": [f"t{i}" for i in range(n_target)]}


def test_round_trip_threshold_on_mean_loo_scores_and_any_member_order(tmp_path: Path) -> None:
    cfg = ScoringConfig()
    enrolled = enroll(tmp_path / "ens", MEMBERS, _embeddings(0), _names(), cfg)
    loaded = load_banks(tmp_path / "ens", MEMBERS)
    assert [b.info.variant for b in loaded.banks] == ["a", "b"]
    assert loaded.threshold == enrolled.threshold and loaded.scoring == cfg.to_dict()
    assert loaded.count_raw("source") == 30 and loaded.count_raw("target") == 4

    scorers = [BankScorer.fit(b, cfg) for b in loaded.banks]
    mean_loo = np.mean([s.loo_scores() for s in scorers], axis=0)
    np.testing.assert_allclose(Scorer(scorers).loo_scores(), mean_loo)
    assert enrolled.threshold["n"] == 34
    # the ensemble threshold is its own calibration, not the mean of the members' thresholds
    member_values = [b.threshold["value"] for b in loaded.banks]
    assert enrolled.threshold["value"] != pytest.approx(np.mean(member_values))

    swapped = load_banks(tmp_path / "ens", MEMBERS[::-1])
    assert [b.info.variant for b in swapped.banks] == ["b", "a"]
    assert swapped.content_hash() == loaded.content_hash()
    assert isinstance(load_banks(tmp_path / "ens", MEMBERS), BankSet)
    # a member directory is an ordinary bank
    doc = json.loads((tmp_path / "ens" / ENSEMBLE_JSON).read_text())
    plain = load_banks(tmp_path / "ens" / doc["members"][1]["subdir"], MEMBERS[1:])
    assert isinstance(plain.banks[0], MemoryBank) and len(plain.banks) == 1 and plain.threshold is not None


def test_wrong_models_and_damaged_ensembles_are_named(tmp_path: Path) -> None:
    ens = tmp_path / "ens"
    enroll(ens, MEMBERS, _embeddings(0), _names(), ScoringConfig())
    where = str(ens / ENSEMBLE_JSON)
    other = _member("c", 8000, 8, "cc")
    with pytest.raises(ModelMismatchError, match=r"no model given for member.* b-") as info:
        load_banks(ens, [MEMBERS[0], other])
    assert where in str(info.value) and "not in the ensemble: c-" in str(info.value)
    with pytest.raises(ModelMismatchError, match="no model given"):
        load_banks(ens, [MEMBERS[0], MEMBERS[0]])
    # same ONNX hash, but metadata of another model
    changed = MemberModel(_member("a", 16000, 8, "aa").info, MEMBERS[0].model_sha256, MEMBERS[0].model_id)
    with pytest.raises(ModelMismatchError, match="sample_rate"):
        load_banks(ens, [changed, MEMBERS[1]])
    with pytest.raises(ModelMismatchError, match="an ensemble bank of 2 models"):
        load_banks(ens, MEMBERS[:1])

    doc = json.loads((ens / ENSEMBLE_JSON).read_text())
    # a member replaced by another (valid) bank
    bad = tmp_path / "bad"
    shutil.copytree(ens, bad)
    enroll(tmp_path / "other", MEMBERS, _embeddings(5), _names(), ScoringConfig())
    sub = doc["members"][1]["subdir"]
    shutil.rmtree(bad / sub)
    shutil.copytree(tmp_path / "other" / sub, bad / sub)
    with pytest.raises(BankError, match=f"{bad / sub}: content does not match .*content_hash"):
        load_banks(bad, MEMBERS)

    for change, message in [
        (lambda d: d.update(format_version=2), "format_version 2"),
        (lambda d: d["members"][0].update(subdir="../escape"), "not a plain, unique directory name"),
        (lambda d: d["members"].pop(), "at least two entries"),
        (lambda d: d["members"][0].pop("model_sha256"), r"members\[0\] needs"),
    ]:
        d = json.loads(json.dumps(doc))
        change(d)
        (bad / ENSEMBLE_JSON).write_text(json.dumps(d))
        with pytest.raises(BankError, match=message) as info:
            load_banks(bad, MEMBERS)
        assert str(bad / ENSEMBLE_JSON) in str(info.value)
    (bad / ENSEMBLE_JSON).write_text("{not json")
    with pytest.raises(BankError, match="not valid JSON"):
        load_banks(bad, MEMBERS)


def test_members_must_hold_the_same_windows(tmp_path: Path) -> None:
    embs = _embeddings(0)
    banks = [MemoryBank(m.info, e, _names()) for m, e in zip(MEMBERS, embs, strict=True)]
    shuffled = _names()
    shuffled["source"] = shuffled["source"][::-1]
    banks[1] = MemoryBank(MEMBERS[1].info, embs[1], shuffled)
    with pytest.raises(BankError, match="same windows in the same order"):
        BankSet(banks, MEMBERS, None, None)


def test_readers_see_a_whole_ensemble_while_it_is_replaced(tmp_path: Path) -> None:
    ens = tmp_path / "ens"
    cfg = ScoringConfig()
    written = {enroll(ens, MEMBERS, _embeddings(0), _names(), cfg).banks.content_hash()}
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(load_banks(ens, MEMBERS).content_hash())
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for seed in range(1, 9):
            written.add(enroll(ens, MEMBERS, _embeddings(seed), _names(), cfg).banks.content_hash())
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert seen and set(seen) <= written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]  # no temp or old dirs left
