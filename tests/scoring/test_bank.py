from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent import fsutil
from edge_agent.errors import BankError, ModelMismatchError
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.knn import HnswIndex
from edge_agent.scoring.scorer import BankScorer

from .configs import knn_only


@pytest.fixture
def info(info_factory):
    return info_factory({"layer_4": 8, "layer_8": 16}, default=("layer_4", "layer_8"))


@pytest.fixture
def bank(info) -> MemoryBank:
    rng = np.random.default_rng(0)
    emb = {"source": {"layer_4": rng.normal(size=(120, 8)), "layer_8": rng.normal(size=(120, 16))},
           "target": {"layer_4": rng.normal(size=(6, 8)) + 2, "layer_8": rng.normal(size=(6, 16)) + 2}}
    names = {"source": [f"s{i}.wav" for i in range(120)], "target": [f"t{i}.wav" for i in range(6)]}
    return MemoryBank(info, emb, names)


CFG = knn_only(exact_below=100, hnsw_m=8, hnsw_ef_construction=40)  # source (120) uses HNSW


def saved(bank: MemoryBank, path: Path, cfg: ScoringConfig = CFG) -> BankScorer:
    scorer = BankScorer.fit(bank, cfg)
    scorer.save(path, threshold={"method": "percentile", "quantile": 0.99, "value": 1.5, "n": 126},
                model_sha256="cd" * 32)
    return scorer


def test_round_trip(bank: MemoryBank, info, tmp_path: Path) -> None:
    mixed = bank.with_memmixup(lam=0.9, k=2)
    scorer = saved(mixed, tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank", expect=info, model_sha256="cd" * 32)
    for layer in info.layers:
        for domain in ("source", "target"):
            assert np.array_equal(loaded.get_raw(layer, domain), bank.get_raw(layer, domain))
            assert np.array_equal(loaded.get(layer, domain), mixed.get(layer, domain))
    assert loaded.names == bank.names and loaded.mixup == mixed.mixup
    assert loaded.count("target") == 6 * 3 and loaded.count_raw("target") == 6
    assert loaded.threshold is not None and loaded.threshold["value"] == 1.5
    assert loaded.model_sha256 == "cd" * 32 and loaded.metric == "euclidean"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", loaded.created_at or "")
    assert loaded.content_hash() == bank.content_hash() and loaded.fingerprint() == mixed.fingerprint()
    assert set(loaded.stored_indexes) == {("layer_4", "source"), ("layer_8", "source")}
    doc = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert doc["counts"] == {"source": 120, "target": 6} and doc["dims"] == {"layer_4": 8, "layer_8": 16}
    assert doc["model"]["variant"] == "mn04" and doc["mixup"] == {"lam": 0.9, "k": 2}
    # Same statistics, the stored HNSW graph is reused, same scores.
    again = BankScorer.fit(loaded, CFG)
    assert again.state() == scorer.state()
    assert again.normalizers["layer_8"].bank.source.graph is loaded.stored_indexes[("layer_8", "source")].graph
    q = {"layer_4": np.ones((3, 8)), "layer_8": np.ones((3, 16))}
    assert np.array_equal(again.score(q), scorer.score(q))


def test_stored_statistics_are_reused_only_for_the_same_config(bank: MemoryBank, tmp_path: Path, caplog) -> None:
    cfg = knn_only(normalizer="zscore-domain")
    saved(bank, tmp_path / "bank", cfg)
    loaded = MemoryBank.load(tmp_path / "bank")
    assert loaded.scorer_state is not None
    loaded.scorer_state["layers"]["layer_8"]["stats"]["mu_source"] = 123.0  # proves it is read, not refitted
    assert BankScorer.fit(loaded, cfg).state()["layers"]["layer_8"]["stats"]["mu_source"] == 123.0
    with caplog.at_level("INFO", logger="edge_agent.scoring.scorer"):
        other = BankScorer.fit(loaded, knn_only(normalizer="zscore-domain", k_n=2))
    assert "event=scorer_refit" in caplog.text
    assert other.state()["layers"]["layer_8"]["stats"]["mu_source"] != 123.0


def test_scorer_state_of_another_bank_is_refused(bank: MemoryBank, tmp_path: Path) -> None:
    state = BankScorer.fit(bank, knn_only()).state()
    with pytest.raises(BankError, match="different bank"):
        bank.with_memmixup().save(tmp_path / "b", scorer_state=state)


def test_memmixup_formula_on_hand_made_points(info_factory) -> None:
    info = info_factory({"layer_1": 2})
    source = np.array([[0, 0], [4, 0], [0, 3], [10, 10]], dtype=np.float32)
    target = np.array([[5, 0], [0, 5]], dtype=np.float32)
    raw = MemoryBank(info, {"source": {"layer_1": source}, "target": {"layer_1": target}})
    mixed = raw.with_memmixup(lam=0.9, k=2)
    # (5,0): nearest sources (4,0) d=1, (0,0) d=5 -> 0.9*(5,0)+0.1*(4,0) = (4.9,0); 0.1*(0,0) -> (4.5,0)
    # (0,5): nearest (0,3) d=2, (0,0) d=5 -> (0,4.8), (0,4.5)
    want = [[5, 0], [0, 5], [4.9, 0], [4.5, 0], [0, 4.8], [0, 4.5]]
    assert np.allclose(mixed.get("layer_1", "target"), want, atol=1e-6)
    assert mixed.target_groups("layer_1").tolist() == [0, 1, 0, 0, 1, 1]
    assert np.array_equal(mixed.get_raw("layer_1", "target"), target)
    assert np.array_equal(raw.get("layer_1", "target"), target)  # the original bank is untouched
    # Re-running from a mixed bank starts from the raw refs.
    rerun = mixed.with_memmixup(lam=0.5, k=1)
    assert np.allclose(rerun.get("layer_1", "target"), [[5, 0], [0, 5], [4.5, 0], [0, 4]], atol=1e-6)
    # k is capped at the source size
    assert raw.with_memmixup(k=50).count("target") == 2 + 2 * 4


def test_loo_leaves_out_a_target_ref_and_its_mixes(info_factory) -> None:
    info = info_factory({"layer_1": 1})
    src = np.array([[0.0], [1.0], [3.0], [7.0]], dtype=np.float32)
    bank = MemoryBank(info, {"source": {"layer_1": src}, "target": {"layer_1": np.array([[10.0]])}})
    mixed = bank.with_memmixup(lam=0.9, k=2)  # target rows: 10, 9.7, 9.3
    loo = BankScorer.fit(mixed, knn_only(normalizer="none")).loo_scores()
    # source ref 7: min(d_S = 4, d_T = |7 - 9.3| = 2.3); target ref 10: only d_S = 3 is left
    assert loo.shape == (5,)
    assert loo[3] == pytest.approx(2.3, rel=1e-6) and loo[4] == pytest.approx(3.0, rel=1e-12)


def _json(path: Path) -> dict:
    return json.loads((path / "bank.json").read_text())


def _write_json(path: Path, doc: dict) -> None:
    (path / "bank.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "layer_8" / "source.npy").write_bytes((p / "layer_8" / "source.npy").read_bytes()[:-40]),
         r"layer_8/source\.npy: content does not match .*truncated"),
        (lambda p: (p / "layer_4" / "target.npy").unlink(), r"layer_4/target\.npy: missing"),
        (lambda p: (p / "layer_8" / "source.hnsw").unlink(), r"layer_8/source\.hnsw: missing"),
        (lambda p: (p / "layer_4" / "source.hnsw").write_bytes(b"garbage"),
         r"layer_4/source\.hnsw: HNSW index does not match"),
        (lambda p: (p / "bank.json").write_text('{"format_version": 1, '), r"bank\.json: not valid JSON"),
        (lambda p: (p / "bank.json").unlink(), r"bank\.json: missing"),
        (lambda p: _write_json(p, {**_json(p), "format_version": 99}), r"bank\.json: format_version is 99"),
        (lambda p: _write_json(p, {**_json(p), "counts": {"source": 119, "target": 6}}),
         r"layer_4/source\.npy: shape \[120, 8\], bank\.json says \[119, 8\]"),
        (lambda p: _write_json(p, {**_json(p), "dims": {"layer_4": 9, "layer_8": 16}}),
         r"bank\.json: dims\.layer_4 = 9"),
        (lambda p: _write_json(p, {**_json(p), "content_hash": "0" * 64}), r"bank\.json: content_hash"),
        (lambda p: _write_json(p, {k: v for k, v in _json(p).items() if k != "names"}),
         r"bank\.json: malformed \(KeyError: 'names'\)"),
        (lambda p: _write_json(p, {**_json(p), "model": {**_json(p)["model"], "dims": [8]}}),
         r"bank\.json: layers .* and dims .* differ"),
        (lambda p: _write_json(p, {**_json(p), "counts": {"source": 10**12, "target": 6}}),
         r"bank\.json: counts\.source is 1000000000000; a bank holds 0 to 5000000 refs"),
    ],
)
def test_damaged_banks_give_clear_errors(bank: MemoryBank, tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "bank"
    saved(bank, path)
    damage(path)
    with pytest.raises(BankError, match=message):
        MemoryBank.load(path)


def test_same_size_corruption_is_detected(bank: MemoryBank, tmp_path: Path) -> None:
    path = tmp_path / "bank"
    saved(bank, path)
    npy = path / "layer_4" / "target.npy"
    data = bytearray(npy.read_bytes())
    data[-3] ^= 0xFF
    npy.write_bytes(bytes(data))
    with pytest.raises(BankError, match=r"layer_4/target\.npy: content does not match"):
        MemoryBank.load(path)


def test_model_mismatch(bank: MemoryBank, info_factory, tmp_path: Path) -> None:
    saved(bank, tmp_path / "bank")
    other = info_factory({"layer_4": 8, "layer_8": 16}, variant="mn10")
    with pytest.raises(ModelMismatchError, match=r"variant: 'mn10' != 'mn04'"):
        MemoryBank.load(tmp_path / "bank", expect=other)
    with pytest.raises(ModelMismatchError, match="model sha256"):
        MemoryBank.load(tmp_path / "bank", model_sha256="ef" * 32)
    fewer = info_factory({"layer_8": 16})
    with pytest.raises(ModelMismatchError, match="layer_4"):
        MemoryBank.load(tmp_path / "bank", expect=fewer)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="directory missing"):
        MemoryBank.load(tmp_path / "nope")


def test_failed_save_keeps_the_old_bank(bank: MemoryBank, tmp_path: Path) -> None:
    path = tmp_path / "bank"
    saved(bank, path)
    before = MemoryBank.load(path).content_hash()
    changed = MemoryBank(bank.info, {"source": {layer: bank.get_raw(layer, "source")[:50] for layer in bank.layers}})
    with pytest.raises(BankError, match="not JSON"):
        changed.save(path, scorer_state={"bank_fingerprint": changed.fingerprint(), "x": object()})
    assert MemoryBank.load(path).content_hash() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no temp dirs left behind


@pytest.mark.parametrize("exchange", [True, False])
def test_reader_sees_old_or_new_bank_during_replacement(bank: MemoryBank, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:  # the two-rename fallback for kernels/filesystems without RENAME_EXCHANGE
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    path = tmp_path / "bank"
    small = MemoryBank(bank.info, {"source": {layer: bank.get_raw(layer, "source")[:60] for layer in bank.layers}})
    versions = [bank, small]
    hashes = {b.content_hash() for b in versions}
    versions[0].save(path)
    seen: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(MemoryBank.load(path).content_hash())
            except Exception as exc:  # collected: the assertion below must see it
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            versions[i % 2].save(path)
            time.sleep(0.005)  # a reader needs a moment between two swaps to finish a retry
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[:3]
    assert seen and set(seen) <= hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


def test_save_refuses_an_index_of_other_refs(bank: MemoryBank, tmp_path: Path) -> None:
    other = HnswIndex(np.zeros((120, 8), dtype=np.float32), "euclidean")
    with pytest.raises(BankError, match="not built on this bank"):
        bank.save(tmp_path / "b", indexes={("layer_4", "source"): other})


def test_constructor_validation(info) -> None:
    with pytest.raises(BankError, match="needs source"):
        MemoryBank(info, {"target": {"layer_4": np.zeros((2, 8))}})
    with pytest.raises(BankError, match=r"layer_4/source: expected \[N, 8\]"):
        MemoryBank(info, {"source": {"layer_4": np.zeros((2, 7))}})
    with pytest.raises(BankError, match="NaN"):
        MemoryBank(info, {"source": {"layer_4": np.full((2, 8), np.nan)}})
    with pytest.raises(BankError, match="not outputs"):
        MemoryBank(info, {"source": {"layer_9": np.zeros((2, 8))}})
    with pytest.raises(BankError, match="3 source names for 2 refs"):
        MemoryBank(info, {"source": {"layer_4": np.zeros((2, 8))}}, names={"source": ["a", "b", "c"]})
