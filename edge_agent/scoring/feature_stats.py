"""Feature-statistics anomaly term: per-dimension z-scores against each domain's mean and std.

A second score beside the kNN score, one per layer (in the spirit of the "statistical feature
difference" of the GISP-HEU DCASE 2025 report). At enrollment, for each domain d with at least
`MIN_REFS` (2) raw refs: mu_d and sigma_d, the mean and the population std of every embedding
dimension over that domain's refs, sigma_d floored at `floor` (below). For an embedding x:

    score_d(x) = sqrt(mean_j ((x_j - mu_dj) / sigma_dj)^2)        (RMS z-distance)
    score(x)   = min over the fitted domains of score_d(x)       (the nearest domain)

A domain with fewer than 2 refs has no std and is skipped: with only one fitted domain the score
is that domain's score_d (a bank with no target refs yet, or a single target ref, scores against
the source statistics alone). At least one domain must have 2 refs.

**Floor.** floor = eps * s_typ, fixed at enrollment (default eps = 1e-3). s_typ is the layer's
typical within-domain spread: the median over dimensions of the positive pooled within-domain
stds sqrt(sum_d M2_dj / sum_d n_d) (M2 = centred sum of squares; fitted domains only). The median
is not moved by a few "massive activation" dimensions nor by many dead (constant) ones; pooling
within domains keeps the source/target offset out of it. Fallbacks when no dimension varies: the
RMS of the pooled mean, then 1. A constant dimension thus gets sigma = floor: a ref or query equal
to the constant contributes exactly 0, and a query that differs contributes a large but finite z.

**Leave-one-out scores (closed form, O(N*D)).** For ref i of domain d (n refs, mean m, centred
deviation c = x_i - m, centred sum of squares M2), the statistics of d without ref i are

    mean_-i = m - c / (n - 1)          x_i - mean_-i = c * n / (n - 1)
    M2_-i   = M2 - c^2 * n / (n - 1)   sigma_-i = max(sqrt(M2_-i / (n - 1)), floor)

and its LOO score is the min of its RMS z-distance to d under these statistics (d skipped when
n - 1 < 2) and to every other fitted domain under the full ones; +inf when no domain is left.
The floor is the one fitted on the whole bank (like the normalizers' statistics). Numerics: all
in float64; the mean is computed on data shifted by the domain's first ref and M2 by a corrected
two-pass sum over centred data (no sum-of-squares cancellation for a large common offset). The
downdate M2 - c^2 n/(n-1) cancels when ref i carries almost all of a dimension's spread (a sparse
dimension, non-zero in one ref); entries where it keeps less than `_DOWNDATE_TOL` of M2 are
recomputed directly from the column without ref i. For n >= 3 at most one ref per dimension can
qualify, so this stays O(N*D).

**Serialisation.** to_dict() holds the layer, dim, eps, floor, loo_mean, loo_std and per fitted
domain {count, mean, std}, the arrays as base64 of little-endian float64 (exact round trip: a
reloaded scorer gives bit-identical scores). Size: 4 * ceil(8 * D / 3) characters per array, two
arrays per domain: D = 768 -> 8 KiB per array, about 32 KiB per layer with both domains;
D = 6144 -> 64 KiB per array, about 256 KiB per layer. from_dict() validates every key and raises
ValueError naming the key at fault.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = 1
DOMAINS: tuple[str, str] = ("source", "target")  # the bank's domains, in its ref order
MIN_REFS = 2  # a domain needs this many refs to have a std
DEFAULT_EPS = 1e-3  # sigma floor relative to the layer's typical within-domain std
MAX_DIM = 1 << 20  # refuses absurd dims in a stored document before decoding anything
_BLOCK_ELEMENTS = 4_000_000  # float64 temporaries of at most ~32 MiB
_DOWNDATE_TOL = 1e-4  # M2_-i below this share of M2: recompute it without the downdate
_LOO_STD_MIN = 1e-12  # relative to max(1, |loo_mean|): below it the LOO scores are all equal
_TOP_KEYS = frozenset({"version", "layer", "dim", "eps", "floor", "loo_mean", "loo_std", "domains"})
_DOMAIN_KEYS = frozenset({"count", "mean", "std"})


class TooFewRefs(ValueError):
    """The bank's refs are too few for the term (a domain of MIN_REFS, and 2 finite leave-one-out scores)."""


@dataclass(frozen=True, eq=False)
class DomainStats:
    """Per-dimension mean and (floored) population std of one domain's refs; float64 [D]."""

    mean: np.ndarray
    std: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def rms_z(self, x: np.ndarray) -> np.ndarray:
        """[B, D] -> [B]: sqrt(mean_j ((x_j - mean_j) / std_j)^2), in float64, in row blocks."""
        return _rms_z(x, self.mean, self.std)


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Fitted feature statistics of one layer (see the module docstring for the formulas)."""

    layer: str
    domains: dict[str, DomainStats]  # fitted domains only, in DOMAINS order
    loo_mean: float  # mean of the finite leave-one-out scores
    loo_std: float  # their population std (1.0 when they are all equal)
    floor: float  # the sigma floor, eps * the layer's typical within-domain std
    eps: float

    def __post_init__(self) -> None:
        _check_stats(self)

    @property
    def dim(self) -> int:
        return next(iter(self.domains.values())).dim

    # --- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, layer: str, refs: Mapping[str, np.ndarray],
            eps: float = DEFAULT_EPS) -> tuple[FeatureStats, np.ndarray]:
        """Statistics of the raw refs {domain: [N_d, D]} and the refs' leave-one-out scores.

        Returns (stats, loo) with loo [N_source + N_target] in the bank's order (source refs, then
        target refs; +inf for a ref that no domain is left to score). Raises ValueError when the
        input is malformed; TooFewRefs (a ValueError) when no domain has 2 refs, or fewer than 2 leave-one-out
        scores are finite.
        """
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"feature stats eps: must be a finite number > 0, got {eps!r}")
        arrays = _checked_refs(refs)
        counts = {d: int(x.shape[0]) for d, x in arrays.items()}
        moments = {d: _moments(x) for d, x in arrays.items() if x.shape[0] >= MIN_REFS}
        if not moments:
            raise TooFewRefs(f"feature stats of layer {layer}: no domain has {MIN_REFS} refs (counts {counts})")
        floor = float(eps) * _typical_scale(moments, {d: counts[d] for d in moments})
        domains = {d: DomainStats(mean, np.maximum(np.sqrt(m2 / counts[d]), floor), counts[d])
                   for d, (mean, m2) in moments.items()}
        loo_parts = []
        for d, x in arrays.items():
            best = np.full(x.shape[0], np.inf)
            for other, st in domains.items():
                if other != d:
                    best = np.minimum(best, st.rms_z(x))
            if d in moments and x.shape[0] - 1 >= MIN_REFS:
                best = np.minimum(best, _loo_own(x, *moments[d], floor))
            loo_parts.append(best)
        loo = np.concatenate(loo_parts) if loo_parts else np.zeros(0)
        finite = loo[np.isfinite(loo)]
        if finite.size < 2:
            raise TooFewRefs(f"feature stats of layer {layer}: {finite.size} finite leave-one-out score(s), need 2 "
                             f"(a domain of 2 refs has none of its own; counts {counts})")
        loo_mean, loo_std = float(finite.mean()), float(finite.std())
        if not loo_std > _LOO_STD_MIN * max(1.0, abs(loo_mean)):
            loo_std = 1.0
        return cls(layer, domains, loo_mean, loo_std, floor, float(eps)), loo

    # --- scoring ------------------------------------------------------------------------------
    def score(self, x: np.ndarray) -> np.ndarray:
        """[B, D] -> [B] float64: min over the fitted domains of the RMS z-distance."""
        arr = np.asarray(x)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"feature stats of layer {self.layer}: expected [B, {self.dim}] embeddings, "
                             f"got shape {list(arr.shape)}")
        out = np.full(arr.shape[0], np.inf)
        for st in self.domains.values():
            out = np.minimum(out, st.rms_z(arr))
        return out

    def standardize(self, scores: np.ndarray) -> np.ndarray:
        """(scores - loo_mean) / loo_std: the training refs' LOO scores get mean 0, std 1."""
        return (np.asarray(scores, dtype=np.float64) - self.loo_mean) / self.loo_std

    def standardized(self, x: np.ndarray) -> np.ndarray:
        """[B, D] -> [B]: standardize(score(x)), for fusion with other standardized terms."""
        return self.standardize(self.score(x))

    # --- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready statistics (arrays as base64 little-endian float64)."""
        return {
            "version": FORMAT_VERSION, "layer": self.layer, "dim": self.dim, "eps": self.eps, "floor": self.floor,
            "loo_mean": self.loo_mean, "loo_std": self.loo_std,
            "domains": {d: {"count": st.count, "mean": _encode(st.mean), "std": _encode(st.std)}
                        for d, st in self.domains.items()},
        }

    @classmethod
    def from_dict(cls, doc: object) -> FeatureStats:
        """Statistics from to_dict()'s document; ValueError naming the key at fault."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"feature stats: must be a mapping, got {type(doc).__name__}")
        _known_keys(doc, _TOP_KEYS, "")
        version = _integer(doc, "version", "version", 1)
        if version != FORMAT_VERSION:
            raise ValueError(f"feature stats version: {version} is not supported (this code reads {FORMAT_VERSION})")
        layer = doc["layer"]
        if not isinstance(layer, str) or not layer:
            raise ValueError("feature stats layer: must be a non-empty string")
        dim = _integer(doc, "dim", "dim", 1)
        if dim > MAX_DIM:
            raise ValueError(f"feature stats dim: {dim} exceeds {MAX_DIM}")
        eps, floor = _number(doc, "eps", "eps"), _number(doc, "floor", "floor")
        loo_mean, loo_std = _number(doc, "loo_mean", "loo_mean"), _number(doc, "loo_std", "loo_std")
        raw_domains = doc["domains"]
        if not isinstance(raw_domains, Mapping) or not raw_domains:
            raise ValueError("feature stats domains: must be a non-empty mapping of domain -> statistics")
        domains = {}
        for name in raw_domains:
            if name not in DOMAINS:
                raise ValueError(f"feature stats domains.{name}: unknown domain; known: {', '.join(DOMAINS)}")
        for name in DOMAINS:
            if name not in raw_domains:
                continue
            key = f"domains.{name}"
            entry = raw_domains[name]
            if not isinstance(entry, Mapping):
                raise ValueError(f"feature stats {key}: must be a mapping")
            _known_keys(entry, _DOMAIN_KEYS, key + ".")
            count = _integer(entry, "count", f"{key}.count", MIN_REFS)
            mean = _decode(entry["mean"], dim, f"{key}.mean")
            std = _decode(entry["std"], dim, f"{key}.std")
            domains[name] = DomainStats(mean, std, count)
        return cls(layer, domains, loo_mean, loo_std, floor, eps)


# --- validation -------------------------------------------------------------------------------------
def _check_stats(st: FeatureStats) -> None:
    if not isinstance(st.layer, str) or not st.layer:
        raise ValueError("feature stats layer: must be a non-empty string")
    for key in ("eps", "floor", "loo_std"):
        value = getattr(st, key)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"feature stats {key}: must be finite and > 0, got {value!r}")
    if not math.isfinite(st.loo_mean):
        raise ValueError(f"feature stats loo_mean: must be finite, got {st.loo_mean!r}")
    if not st.domains:
        raise ValueError("feature stats domains: at least one domain is needed")
    dims = set()
    for name, ds in st.domains.items():
        key = f"domains.{name}"
        if name not in DOMAINS:
            raise ValueError(f"feature stats {key}: unknown domain; known: {', '.join(DOMAINS)}")
        if isinstance(ds.count, bool) or not isinstance(ds.count, int) or ds.count < MIN_REFS:
            raise ValueError(f"feature stats {key}.count: must be an integer >= {MIN_REFS}, got {ds.count!r}")
        for field in ("mean", "std"):
            arr = getattr(ds, field)
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.shape[0] < 1 or arr.dtype != np.float64:
                raise ValueError(f"feature stats {key}.{field}: must be a float64 vector")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"feature stats {key}.{field}: contains NaN or inf")
            dims.add(arr.shape[0])
        if np.any(ds.std < st.floor):
            raise ValueError(f"feature stats {key}.std: values below the floor {st.floor!r}")
    if len(dims) != 1:
        raise ValueError(f"feature stats domains: vectors of different lengths {sorted(dims)}")


def _known_keys(doc: Mapping[str, Any], known: frozenset[str], prefix: str) -> None:
    for key in doc:
        if key not in known:
            raise ValueError(f"feature stats {prefix}{key}: unknown key; known: {', '.join(sorted(known))}")
    for key in sorted(known):
        if key not in doc:
            raise ValueError(f"feature stats {prefix}{key}: missing")


def _integer(doc: Mapping[str, Any], field: str, key: str, low: int) -> int:
    value = doc[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"feature stats {key}: must be an integer >= {low}, got {value!r}")
    return value


def _number(doc: Mapping[str, Any], field: str, key: str) -> float:
    value = doc[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"feature stats {key}: must be a finite number, got {value!r}")
    return float(value)


def _encode(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<f8").tobytes()).decode("ascii")


def _decode(value: object, dim: int, key: str) -> np.ndarray:
    if not isinstance(value, str):
        raise ValueError(f"feature stats {key}: must be a base64 string of {dim} float64 values")
    if len(value) != 4 * math.ceil(8 * dim / 3):
        raise ValueError(f"feature stats {key}: {len(value)} base64 characters, {dim} float64 values need "
                         f"{4 * math.ceil(8 * dim / 3)}")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"feature stats {key}: not valid base64") from None
    if len(data) != 8 * dim:
        raise ValueError(f"feature stats {key}: {len(data)} bytes, expected {8 * dim}")
    arr = np.frombuffer(data, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"feature stats {key}: contains NaN or inf")
    return arr


def _checked_refs(refs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(refs, Mapping) or not refs:
        raise ValueError("feature stats refs: must be a non-empty mapping of domain -> [N, D] array")
    for name in refs:
        if name not in DOMAINS:
            raise ValueError(f"feature stats refs.{name}: unknown domain; known: {', '.join(DOMAINS)}")
    out: dict[str, np.ndarray] = {}
    dims = set()
    for name in DOMAINS:
        if name not in refs:
            continue
        arr = np.asarray(refs[name])
        if arr.ndim != 2 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"feature stats refs.{name}: expected a numeric [N, D] array, got shape {list(arr.shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"feature stats refs.{name}: contains NaN or inf")
        dims.add(arr.shape[1])
        out[name] = arr
    if len(dims) != 1:
        raise ValueError(f"feature stats refs: domains have different dims {sorted(dims)}")
    return out


# --- numerics ---------------------------------------------------------------------------------------
def _rows(dim: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, dim))


def _rms_z(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0])
    rows = _rows(x.shape[1])
    for start in range(0, x.shape[0], rows):
        z = (np.asarray(x[start:start + rows], dtype=np.float64) - mean) / std
        out[start:start + rows] = np.sqrt(np.einsum("ij,ij->i", z, z) / x.shape[1])
    return out


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and centred sum of squares M2 per column (float64): shifted mean, corrected two-pass M2."""
    n, dim = x.shape
    rows = _rows(dim)
    shift = np.asarray(x[0], dtype=np.float64)
    total = np.zeros(dim)
    for start in range(0, n, rows):
        total += (np.asarray(x[start:start + rows], dtype=np.float64) - shift).sum(axis=0)
    mean = shift + total / n
    m2, drift = np.zeros(dim), np.zeros(dim)
    for start in range(0, n, rows):
        c = np.asarray(x[start:start + rows], dtype=np.float64) - mean
        m2 += np.einsum("ij,ij->j", c, c)
        drift += c.sum(axis=0)
    return mean, np.maximum(m2 - drift * drift / n, 0.0)


def _typical_scale(moments: dict[str, tuple[np.ndarray, np.ndarray]], counts: dict[str, int]) -> float:
    pooled_m2 = sum(m2 for _, m2 in moments.values())
    total = sum(counts.values())
    std = np.sqrt(np.asarray(pooled_m2) / total)
    positive = std[std > 0]
    if positive.size:
        return float(np.median(positive))
    pooled_mean = sum(counts[d] * mean for d, (mean, _) in moments.items()) / total
    rms = float(np.sqrt(np.mean(np.square(pooled_mean))))
    return rms if rms > 0 and math.isfinite(rms) else 1.0


def _loo_own(x: np.ndarray, mean: np.ndarray, m2: np.ndarray, floor: float) -> np.ndarray:
    """[n] RMS z-distance of each ref to its own domain's statistics without it (n >= 3)."""
    n, dim = x.shape
    grow = n / (n - 1)
    out = np.empty(n)
    rows = _rows(dim)
    for start in range(0, n, rows):
        c = np.asarray(x[start:start + rows], dtype=np.float64) - mean
        m2_loo = m2 - c * c * grow
        bad_r, bad_j = np.nonzero((m2_loo <= _DOWNDATE_TOL * m2) & (m2 > 0))
        if bad_r.size:
            m2_loo[bad_r, bad_j] = _m2_without(x, mean, start + bad_r, bad_j, c[bad_r, bad_j])
        sd = np.maximum(np.sqrt(np.maximum(m2_loo, 0.0) / (n - 1)), floor)
        z = c * grow / sd
        out[start:start + rows] = np.sqrt(np.einsum("ij,ij->i", z, z) / dim)
    return out


def _m2_without(x: np.ndarray, mean: np.ndarray, refs: np.ndarray, cols: np.ndarray, c: np.ndarray) -> np.ndarray:
    """M2 of column cols[k] without row refs[k], summed directly (corrected two-pass about the LOO mean)."""
    n = x.shape[0]
    out = np.empty(refs.shape[0])
    step = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, refs.shape[0], step):
        r, j = refs[start:start + step], cols[start:start + step]
        delta = -c[start:start + step] / (n - 1)  # LOO mean - full mean
        e = np.asarray(x[:, j], dtype=np.float64) - (mean[j] + delta)
        e[r, np.arange(r.shape[0])] = 0.0
        s1 = e.sum(axis=0)
        out[start:start + step] = np.maximum(np.einsum("ij,ij->j", e, e) - s1 * s1 / (n - 1), 0.0)
    return out
