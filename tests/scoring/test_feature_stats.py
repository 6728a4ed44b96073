"""Feature-statistics term: closed-form leave-one-out against brute force, scoring, floor, serialisation."""

from __future__ import annotations

import base64
import copy
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edge_agent.scoring import bank
from edge_agent.scoring.feature_stats import DEFAULT_EPS, DOMAINS, DomainStats, FeatureStats, TooFewRefs

RTOL = 1e-9


def rms_z(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The direct formula: sqrt(mean_j ((x_j - mu_j) / sigma_j)^2), row by row."""
    return np.sqrt(np.mean(((np.asarray(x, np.float64) - mean) / std) ** 2, axis=1))


def brute_force_loo(refs: dict[str, np.ndarray], floor: float) -> np.ndarray:
    """Refit without ref i (numpy mean / population std, same floor), score ref i; source then target."""
    out = []
    for own in DOMAINS:
        if own not in refs:
            continue
        for i in range(refs[own].shape[0]):
            reduced = {d: (np.delete(x, i, axis=0) if d == own else x) for d, x in refs.items()}
            domains = {d: DomainStats(x.astype(np.float64).mean(axis=0),
                                      np.maximum(x.astype(np.float64).std(axis=0), floor), x.shape[0])
                       for d, x in reduced.items() if x.shape[0] >= 2}
            if not domains:
                out.append(math.inf)
                continue
            refit = FeatureStats("l", domains, 0.0, 1.0, floor, DEFAULT_EPS)
            out.append(float(refit.score(refs[own][i:i + 1])[0]))
    return np.asarray(out)


def naive_loo(x: np.ndarray) -> np.ndarray:
    """Leave-one-out from raw sums (E[x^2] - E[x]^2): what the stability case must catch."""
    n = x.shape[0]
    s1, s2 = x.sum(axis=0), (x * x).sum(axis=0)
    mean = (s1 - x) / (n - 1)
    var = np.maximum((s2 - x * x) / (n - 1) - mean * mean, 0.0)
    return np.sqrt(np.mean((x - mean) ** 2 / var, axis=1))


def randn(seed: int, n: int, d: int, offset: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return offset + scale * rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d)


CASES: dict[str, Callable[[], dict[str, np.ndarray]]] = {
    "one-domain-n3": lambda: {"source": randn(1, 3, 8)},
    "one-domain-n200": lambda: {"source": randn(2, 200, 32)},
    "two-domains-n3": lambda: {"source": randn(3, 3, 8), "target": randn(4, 3, 8, offset=0.5)},
    "two-domains-n200": lambda: {"source": randn(5, 200, 32), "target": randn(6, 10, 32, offset=1.0)},
    "target-of-2": lambda: {"source": randn(7, 50, 16), "target": randn(8, 2, 16, offset=0.5)},
    "target-of-1": lambda: {"source": randn(9, 50, 16), "target": randn(10, 1, 16, offset=0.5)},
    "float32": lambda: {"source": randn(11, 100, 24).astype(np.float32),
                        "target": randn(12, 5, 24, offset=0.3).astype(np.float32)},
    "offset-1e6-one-domain": lambda: {"source": randn(13, 200, 16, offset=1e6)},
    "offset-1e6-two-domains": lambda: {"source": randn(14, 200, 16, offset=1e6),
                                       "target": randn(15, 3, 16, offset=1e6 + 2.0)},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_form_loo_equals_brute_force(case: str) -> None:
    refs = CASES[case]()
    stats, loo = FeatureStats.fit("l", refs)
    want = brute_force_loo(refs, stats.floor)
    assert loo.shape == (sum(x.shape[0] for x in refs.values()),)
    np.testing.assert_allclose(loo, want, rtol=RTOL, atol=0)
    finite = loo[np.isfinite(loo)]
    assert stats.loo_mean == pytest.approx(finite.mean(), rel=1e-12)
    assert stats.loo_std == pytest.approx(finite.std(), rel=1e-12)


def test_large_offset_is_a_real_stability_case() -> None:
    # Raw sums of squares lose everything at a 1e6 offset; the closed form must not.
    x = randn(13, 200, 16, offset=1e6)
    stats, loo = FeatureStats.fit("l", {"source": x})
    want = brute_force_loo({"source": x}, stats.floor)
    naive_err = np.max(np.abs(naive_loo(x) - want) / want)
    assert naive_err > 1e-6
    assert np.max(np.abs(loo - want) / want) < RTOL


@pytest.mark.skipif(bool(np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps), reason="long double is float64 here")
def test_large_offset_against_extended_precision() -> None:
    # float64 brute force carries ~3e-10 of its own error at a 1e6 offset (the mean rounds to ulp(1e6));
    # an 80-bit reference shows that the closed form is the more accurate of the two.
    x = randn(13, 200, 16, offset=1e6)
    stats, loo = FeatureStats.fit("l", {"source": x})
    ext = x.astype(np.longdouble)
    ref = []
    for i in range(ext.shape[0]):
        rest = np.delete(ext, i, axis=0)
        mean = rest.mean(axis=0)
        sd = np.maximum(np.sqrt(((rest - mean) ** 2).mean(axis=0)), stats.floor)
        ref.append(np.sqrt(np.mean(((ext[i] - mean) / sd) ** 2)))
    want = np.asarray(ref, dtype=np.longdouble)
    assert float(np.max(np.abs(loo - want) / want)) < 1e-10


def test_sparse_dimension_downdate_is_recomputed() -> None:
    # Dimension 0 is non-zero in one ref only: without that ref the dimension is constant, and the
    # downdate M2 - c^2 n/(n-1) would leave rounding noise (~1e-16 * 1e16) instead of 0.
    x = randn(20, 200, 16)
    x[:, 0] = 0.37
    x[7, 0] = 1e8 / 3
    t = randn(21, 4, 16, offset=0.5)
    t[:, 1] = 3.1
    t[2, 1] = 3.1 + 1e7 / 7
    # Source alone (with a target, ref 7's min could be taken by the target term instead), then both.
    for refs in ({"source": x}, {"source": x, "target": t}):
        stats, loo = FeatureStats.fit("l", refs)
        np.testing.assert_allclose(loo, brute_force_loo(refs, stats.floor), rtol=RTOL, atol=0)


def test_score_is_the_direct_formula_and_the_min_over_domains() -> None:
    src, tgt = randn(30, 300, 20), randn(31, 8, 20, offset=4.0, scale=0.5)
    stats, _ = FeatureStats.fit("l", {"source": src, "target": tgt})
    mu_s, sd_s = src.mean(axis=0), np.maximum(src.std(axis=0), stats.floor)
    mu_t, sd_t = tgt.mean(axis=0), np.maximum(tgt.std(axis=0), stats.floor)
    np.testing.assert_allclose(stats.domains["source"].mean, mu_s, rtol=1e-12)
    np.testing.assert_allclose(stats.domains["target"].std, sd_t, rtol=1e-12)
    x = np.concatenate([randn(32, 50, 20), randn(33, 50, 20, offset=4.0, scale=0.5), randn(34, 20, 20, scale=5.0)])
    per_s, per_t = rms_z(x, mu_s, sd_s), rms_z(x, mu_t, sd_t)
    got = stats.score(x)
    np.testing.assert_allclose(got, np.minimum(per_s, per_t), rtol=1e-12, atol=0)
    # Both domains win somewhere, so the min is really taken.
    assert np.any(per_s < per_t) and np.any(per_t < per_s)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(stats.score(x[:0]), np.zeros(0))
    with pytest.raises(ValueError, match=r"\[B, 20\]"):
        stats.score(x[:, :19])
    with pytest.raises(ValueError, match=r"\[B, 20\]"):
        stats.score(x[0])


def test_domain_with_one_ref_is_skipped() -> None:
    src, one = randn(40, 60, 12), randn(41, 1, 12, offset=3.0)
    stats, loo = FeatureStats.fit("l", {"source": src, "target": one})
    assert list(stats.domains) == ["source"]
    alone, loo_alone = FeatureStats.fit("l", {"source": src})
    x = randn(42, 10, 12, offset=1.0)
    np.testing.assert_array_equal(stats.score(x), alone.score(x))
    # Source refs: the source without themselves; the lone target ref: the full source statistics.
    np.testing.assert_array_equal(loo[:60], loo_alone)
    assert loo[60] == pytest.approx(rms_z(one, src.mean(axis=0), src.std(axis=0))[0], rel=1e-12)
    # An empty target is the same as none.
    empty, loo_empty = FeatureStats.fit("l", {"source": src, "target": np.zeros((0, 12))})
    assert list(empty.domains) == ["source"]
    np.testing.assert_array_equal(loo_empty, loo_alone)


def test_source_of_two_refs_scores_against_the_target() -> None:
    refs = {"source": randn(43, 2, 6), "target": randn(44, 5, 6, offset=1.0)}
    stats, loo = FeatureStats.fit("l", refs)
    assert list(stats.domains) == ["source", "target"]
    assert np.all(np.isfinite(loo))
    full_t = stats.domains["target"]
    np.testing.assert_allclose(loo[:2], rms_z(refs["source"], full_t.mean, full_t.std), rtol=1e-12)


def test_too_few_refs_refused() -> None:
    with pytest.raises(TooFewRefs, match="no domain has 2 refs"):
        FeatureStats.fit("l", {"source": randn(1, 1, 4), "target": randn(2, 1, 4)})
    with pytest.raises(TooFewRefs, match="finite leave-one-out"):
        FeatureStats.fit("l", {"source": randn(1, 2, 4)})


@pytest.mark.parametrize(("refs", "match"), [
    ({"middle": np.zeros((3, 2))}, r"refs\.middle"),
    ({"source": np.zeros(3)}, r"refs\.source"),
    ({"source": np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]])}, r"refs\.source: contains NaN"),
    ({"source": np.zeros((3, 2)), "target": np.zeros((3, 3))}, "different dims"),
    ({}, "non-empty mapping"),
])
def test_malformed_refs_refused(refs: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FeatureStats.fit("l", refs)


@pytest.mark.parametrize("eps", [0.0, -1.0, math.nan, math.inf, True])
def test_bad_eps_refused(eps: float) -> None:
    with pytest.raises(ValueError, match="eps"):
        FeatureStats.fit("l", {"source": randn(1, 5, 3)}, eps=eps)


def test_constant_dimensions_stay_finite() -> None:
    x = randn(50, 100, 10)
    x[:, 3] = 0.0
    x[:, 7] = 5.0
    t = randn(51, 4, 10, offset=0.2)
    t[:, 3] = 0.0
    t[:, 7] = 5.0
    stats, loo = FeatureStats.fit("l", {"source": x, "target": t})
    typical = float(np.median(np.sqrt((x.var(axis=0) * 100 + t.var(axis=0) * 4) / 104)[[0, 1, 2, 4, 5, 6, 8, 9]]))
    assert stats.floor == pytest.approx(DEFAULT_EPS * typical, rel=1e-12)
    for st in stats.domains.values():
        assert st.std[3] == st.std[7] == stats.floor
    assert np.all(np.isfinite(loo))
    np.testing.assert_allclose(loo, brute_force_loo({"source": x, "target": t}, stats.floor), rtol=RTOL, atol=0)
    q = randn(52, 5, 10)
    q[:, 3], q[:, 7] = 0.0, 5.0
    on, off = stats.score(q), stats.score(q + np.eye(10)[7])
    assert np.all(np.isfinite(on)) and np.all(np.isfinite(off))
    assert np.all(off > on)


def test_all_refs_identical() -> None:
    row = np.arange(1.0, 5.0)
    stats, loo = FeatureStats.fit("l", {"source": np.tile(row, (5, 1))})
    assert stats.floor == pytest.approx(DEFAULT_EPS * float(np.sqrt(np.mean(row**2))))
    np.testing.assert_array_equal(loo, np.zeros(5))
    assert stats.loo_std == 1.0  # all LOO scores equal: standardisation leaves them centred
    assert np.all(np.isfinite(stats.score(row[None] + 1.0)))
    zeros, _ = FeatureStats.fit("l", {"source": np.zeros((3, 4))})
    assert zeros.floor == DEFAULT_EPS


def test_standardized_loo_scores_and_outlier() -> None:
    src, tgt = randn(60, 400, 32), randn(61, 10, 32, offset=0.7)
    stats, loo = FeatureStats.fit("l", {"source": src, "target": tgt})
    z = stats.standardize(loo)
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(z.std()) == pytest.approx(1.0, rel=1e-12)
    x = randn(62, 7, 32, offset=0.3)
    np.testing.assert_array_equal(stats.standardized(x), (stats.score(x) - stats.loo_mean) / stats.loo_std)
    outlier = src.mean(axis=0, keepdims=True) + 8.0 * src.std(axis=0)
    assert float(stats.score(outlier)[0]) > float(loo.max())
    assert float(stats.standardized(outlier)[0]) > float(z.max())


def test_round_trip_is_exact() -> None:
    stats, _ = FeatureStats.fit("layer_11", {"source": randn(70, 50, 24), "target": randn(71, 6, 24, offset=1.0)})
    back = FeatureStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert (back.layer, back.loo_mean, back.loo_std, back.floor, back.eps) == (
        stats.layer, stats.loo_mean, stats.loo_std, stats.floor, stats.eps)
    assert list(back.domains) == list(stats.domains)
    for name, st in stats.domains.items():
        np.testing.assert_array_equal(back.domains[name].mean, st.mean)
        np.testing.assert_array_equal(back.domains[name].std, st.std)
        assert back.domains[name].count == st.count
    x = randn(72, 9, 24)
    np.testing.assert_array_equal(back.score(x), stats.score(x))
    one, _ = FeatureStats.fit("l", {"source": randn(73, 5, 3)})
    assert list(FeatureStats.from_dict(one.to_dict()).domains) == ["source"]


@pytest.mark.parametrize(("dim", "per_array"), [(768, 8192), (6144, 65536)])
def test_json_size_per_layer(dim: int, per_array: int) -> None:
    stats = FeatureStats("layer", {d: DomainStats(np.full(dim, 0.1), np.full(dim, 1.0), 100) for d in DOMAINS},
                         0.5, 0.25, 1e-3, DEFAULT_EPS)
    doc = stats.to_dict()
    assert len(doc["domains"]["source"]["mean"]) == per_array
    size = len(json.dumps(doc))
    assert 4 * per_array < size < 4 * per_array + 400


def _doc() -> dict[str, Any]:
    stats, _ = FeatureStats.fit("l", {"source": randn(80, 20, 4), "target": randn(81, 3, 4)})
    return stats.to_dict()


def _b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, "<f8").tobytes()).decode()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            doc = doc[key]
        doc[last] = value
    return apply


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            doc = doc[key]
        del doc[last]
    return apply


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("missing loo_std", _drop("loo_std"), r"loo_std: missing"),
    ("unknown key", _set("extra", 1), r"extra: unknown key"),
    ("version", _set("version", 2), r"version"),
    ("layer", _set("layer", 5), r"layer"),
    ("dim bool", _set("dim", True), r"dim"),
    ("dim huge", _set("dim", 1 << 40), r"dim"),
    ("loo_std zero", _set("loo_std", 0.0), r"loo_std"),
    ("loo_std nan", _set("loo_std", math.nan), r"loo_std"),
    ("loo_mean inf", _set("loo_mean", math.inf), r"loo_mean"),
    ("loo_mean string", _set("loo_mean", "0.5"), r"loo_mean"),
    ("floor negative", _set("floor", -1.0), r"floor"),
    ("eps missing", _drop("eps"), r"eps: missing"),
    ("domains empty", _set("domains", {}), r"domains"),
    ("domains list", _set("domains", []), r"domains"),
    ("unknown domain", _set("domains.middle", {}), r"domains\.middle"),
    ("domain not a mapping", _set("domains.target", "x"), r"domains\.target"),
    ("domain extra key", _set("domains.source.median", "x"), r"domains\.source\.median"),
    ("domain missing std", _drop("domains.source.std"), r"domains\.source\.std: missing"),
    ("count one", _set("domains.target.count", 1), r"domains\.target\.count"),
    ("count float", _set("domains.source.count", 20.0), r"domains\.source\.count"),
    ("mean short", _set("domains.source.mean", _b64([0.0, 1.0, 2.0])), r"domains\.source\.mean"),
    ("mean list", _set("domains.source.mean", [0.0, 1.0, 2.0, 3.0]), r"domains\.source\.mean"),
    ("mean nan", _set("domains.target.mean", _b64([0.0, math.nan, 2.0, 3.0])), r"domains\.target\.mean.*NaN"),
    ("std inf", _set("domains.source.std", _b64([1.0, math.inf, 1.0, 1.0])), r"domains\.source\.std.*NaN or inf"),
    ("std zero", _set("domains.source.std", _b64([1.0, 0.0, 1.0, 1.0])), r"domains\.source\.std.*floor"),
    ("std bad base64", _set("domains.target.std", "!" * 44), r"domains\.target\.std: not valid base64"),
    ("std non-ascii", _set("domains.target.std", "é" * 44), r"domains\.target\.std: not valid base64"),
]


@pytest.mark.parametrize(("mutate", "match"), [(m, k) for _, m, k in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_doc_refused_naming_the_key(mutate: Callable[[dict[str, Any]], None], match: str) -> None:
    doc = copy.deepcopy(_doc())
    FeatureStats.from_dict(copy.deepcopy(doc))  # the unmodified document loads
    mutate(doc)
    with pytest.raises(ValueError, match=match):
        FeatureStats.from_dict(doc)


def test_from_dict_refuses_non_mapping() -> None:
    with pytest.raises(ValueError, match="mapping"):
        FeatureStats.from_dict([1, 2])


def test_domains_match_the_bank() -> None:
    assert bank.DOMAINS == DOMAINS


def test_blocked_paths_match_unblocked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny blocks exercise the row-block loops (fit, LOO, sparse recompute, scoring) against one block.
    from edge_agent.scoring import feature_stats

    x = randn(90, 40, 8)
    x[:, 2] = 0.37
    x[5, 2] = 1e8 / 3
    refs = {"source": x, "target": randn(91, 4, 8, offset=0.5)}
    q = randn(92, 13, 8)
    stats, loo = FeatureStats.fit("l", refs)
    monkeypatch.setattr(feature_stats, "_BLOCK_ELEMENTS", 17)
    small, loo_small = FeatureStats.fit("l", refs)
    np.testing.assert_allclose(loo_small, loo, rtol=1e-12)
    np.testing.assert_allclose(small.score(q), stats.score(q), rtol=1e-12)
