"""Memory banks of normal embeddings: per layer and domain, MemMixup, atomic save, validated load.

On disk (DESIGN.md "Memory bank on disk"; docs/method.md has the details):

    DIR/bank.json                    format, model, layers, counts, names, statistics, threshold, hashes
    DIR/<layer>/<domain>.npy         raw float32 embeddings [N, D] (domain: source | target)
    DIR/<layer>/<domain>.hnsw        hnswlib graphs, only for the banks that the scorer searched with HNSW

A bank is written to a temp dir beside DIR, fsynced, then swapped in with one rename (an atomic
exchange where the kernel offers it): a reader sees the old bank or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from edge_agent.clock import iso_time
from edge_agent.errors import BankError, EdgeAsdError, ModelMismatchError
from edge_agent.fsutil import (
    fsync_path,
    read_directory_consistently,
    replacing_directory,
    write_synced,
)
from edge_agent.model_info import ModelInfo
from edge_agent.scoring.knn import ExactIndex, HnswIndex, HnswParams, cap_k

FORMAT_VERSION = 1
DOMAINS: tuple[str, str] = ("source", "target")
BANK_JSON = "bank.json"
MAX_REFS = 5_000_000  # refs per domain: far beyond a device's banks (docs/benchmarks.md measures 1M)
_SAFE_NAME = re.compile(r"^(?!\.\.?(@|$))[A-Za-z0-9_.-]+(@[a-z]+)?$")  # a layer, maybe with its pooling


@dataclass(frozen=True)
class MixupSpec:
    lam: float = 0.9
    k: int = 5

    def as_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "k": self.k}


@dataclass
class StoredIndex:
    """An hnswlib graph read from a bank directory, with the parameters it was built with."""

    graph: hnswlib.Index
    params: HnswParams
    count: int


class MemoryBank:
    """Embeddings of normal clips per domain and layer (raw refs; MemMixup applied on top)."""

    def __init__(self, info: ModelInfo, embeddings: dict[str, dict[str, np.ndarray]],
                 names: dict[str, list[str]] | None = None, mixup: MixupSpec | None = None) -> None:
        self.info = info
        unknown = [d for d in embeddings if d not in DOMAINS]
        if unknown:
            raise BankError(f"unknown bank domain(s) {unknown}; expected {DOMAINS}")
        if not embeddings.get("source"):
            raise BankError("a bank needs source embeddings")
        layers = list(embeddings["source"])
        target = embeddings.get("target") or {}
        if target and sorted(target) != sorted(layers):
            raise BankError(f"source layers {sorted(layers)} and target layers {sorted(target)} differ")
        order = [name for name in info.layers if name in layers]
        missing = [name for name in layers if name not in info.layers]
        if missing:
            raise BankError(f"layer(s) {missing} are not outputs of {info.variant} ({', '.join(info.layers)})")
        self.layers: tuple[str, ...] = tuple(order)
        self._raw: dict[str, dict[str, np.ndarray]] = {d: {} for d in DOMAINS}
        for domain in DOMAINS:
            for layer in self.layers:
                arr = embeddings.get(domain, {}).get(layer)
                self._raw[domain][layer] = self._checked(arr, layer, domain)
        for domain in DOMAINS:
            counts = {len(self._raw[domain][layer]) for layer in self.layers}
            if len(counts) > 1:
                raise BankError(f"{domain} layers hold different numbers of refs: {sorted(counts)}")
        names = names or {}
        self.names: dict[str, list[str]] = {}
        for domain in DOMAINS:
            given = list(names.get(domain, [f"{domain}_{i:05d}" for i in range(self.count_raw(domain))]))
            if len(given) != self.count_raw(domain):
                raise BankError(f"{len(given)} {domain} names for {self.count_raw(domain)} refs")
            self.names[domain] = given
        if mixup is not None and not (0.0 < mixup.lam <= 1.0 and mixup.k >= 1):
            raise BankError(f"MemMixup needs 0 < lam <= 1 and k >= 1, got lam={mixup.lam}, k={mixup.k}")
        self.mixup = mixup
        self._augmented: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # Filled by load():
        self.path: Path | None = None
        self.scorer_state: dict[str, Any] | None = None
        self.threshold: dict[str, Any] | None = None
        self.created_at: str | None = None
        self.model_sha256: str | None = None
        self.metric: str | None = None
        self.stored_indexes: dict[tuple[str, str], StoredIndex] = {}

    def _checked(self, arr: np.ndarray | None, layer: str, domain: str) -> np.ndarray:
        dim = self.info.dim(layer)
        if arr is None:
            return np.zeros((0, dim), dtype=np.float32)
        out = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
        if out.ndim != 2 or out.shape[1] != dim:
            raise BankError(f"{layer}/{domain}: expected [N, {dim}] embeddings, got shape {list(out.shape)}")
        if not np.all(np.isfinite(out)):
            raise BankError(f"{layer}/{domain}: embeddings contain NaN or inf")
        return out

    # --- access -------------------------------------------------------------------------------
    def count_raw(self, domain: str) -> int:
        return int(self._raw[domain][self.layers[0]].shape[0]) if self.layers else 0

    def count(self, domain: str) -> int:
        """Refs the scorer searches in `domain` (the target includes MemMixup points)."""
        if domain == "target" and self.layers:
            return int(self.get(self.layers[0], "target").shape[0])
        return self.count_raw(domain)

    def get_raw(self, layer: str, domain: str) -> np.ndarray:
        self._require_layer(layer)
        return self._raw[domain][layer]

    def get(self, layer: str, domain: str) -> np.ndarray:
        """[N, D] float32 refs of one layer and domain as the scorer uses them."""
        if domain == "target" and self.mixup is not None:
            return self._mixed(layer)[0]
        return self.get_raw(layer, domain)

    def target_groups(self, layer: str) -> np.ndarray:
        """For each row of get(layer, "target"): the raw target ref it is or was mixed from."""
        if self.mixup is not None:
            return self._mixed(layer)[1]
        return np.arange(self.count_raw("target"), dtype=np.int64)

    def _require_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise BankError(f"the bank has no layer {layer!r}; it has {', '.join(self.layers)}")

    # --- MemMixup -----------------------------------------------------------------------------
    def with_memmixup(self, lam: float = 0.9, k: int = 5) -> MemoryBank:
        """New bank whose target is T U {lam*t + (1-lam)*s_j : s_j among the k nearest source refs of t}.

        Neighbours are found per layer (exact search). The raw refs are kept, so calling this on a
        mixed bank re-runs MemMixup from the raw target with the new parameters.
        """
        out = MemoryBank(self.info, self._raw, self.names, MixupSpec(float(lam), int(k)))
        out.model_sha256 = self.model_sha256
        return out

    def _mixed(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        if layer not in self._augmented:
            assert self.mixup is not None
            target, source = self.get_raw(layer, "target"), self.get_raw(layer, "source")
            n_t = len(target)
            k = cap_k(self.mixup.k, len(source))
            groups = np.arange(n_t, dtype=np.int64)
            if n_t == 0 or k == 0:
                self._augmented[layer] = (target, groups)
            else:
                _, idx = ExactIndex(source, "euclidean").query(target, k)
                lam = self.mixup.lam
                mixes = lam * target.astype(np.float64)[:, None, :] + (1.0 - lam) * source[idx].astype(np.float64)
                rows = np.concatenate([target, mixes.reshape(n_t * k, -1).astype(np.float32)])
                self._augmented[layer] = (rows, np.concatenate([groups, np.repeat(groups, k)]))
        return self._augmented[layer]

    # --- identity -----------------------------------------------------------------------------
    def _npy_bytes(self) -> dict[str, bytes]:
        """Relative path -> .npy file bytes, in the order the content hash uses."""
        files = {}
        for layer in self.layers:
            for domain in DOMAINS:
                buf = io.BytesIO()
                np.lib.format.write_array(buf, self._raw[domain][layer], version=(1, 0), allow_pickle=False)
                files[f"{layer}/{domain}.npy"] = buf.getvalue()
        return files

    def content_hash(self) -> str:
        return _content_hash(self._npy_bytes())

    def fingerprint(self) -> str:
        """Identity of the refs the scorer sees: raw content plus the MemMixup parameters."""
        mix = json.dumps(None if self.mixup is None else self.mixup.as_dict(), sort_keys=True)
        return hashlib.sha256(f"{self.content_hash()}|{mix}".encode()).hexdigest()

    # --- save ---------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str], scorer_state: dict[str, Any] | None = None,
             threshold: dict[str, Any] | None = None, indexes: dict[tuple[str, str], HnswIndex] | None = None,
             model_sha256: str | None = None) -> Path:
        """Write the bank atomically to `directory` (replacing an existing bank); returns the path.

        indexes: HNSW indexes per (layer, domain) built on get(layer, domain), stored beside the .npy.
        """
        dest = Path(directory)
        for layer in self.layers:
            if not _SAFE_NAME.match(layer):
                raise BankError(f"layer name {layer!r} cannot be a directory name")
        if scorer_state is not None and scorer_state.get("bank_fingerprint") not in (None, self.fingerprint()):
            raise BankError("the scorer state was fitted on a different bank (or MemMixup setting)")
        sha = model_sha256 if model_sha256 is not None else self.model_sha256
        with replacing_directory(dest) as tmp:
            files = self._npy_bytes()
            for rel, data in files.items():
                write_synced(tmp / rel, data)
            index_meta = {}
            for (layer, domain), index in (indexes or {}).items():
                self._check_index(layer, domain, index)
                rel = f"{layer}/{domain}.hnsw"
                index_meta[rel] = {"layer": layer, "domain": domain, "count": index.size, "dim": index.dim,
                                   "params": index.params.as_dict(), "sha256": index.save(tmp / rel)}
                fsync_path(tmp / rel)
            doc = {
                "format_version": FORMAT_VERSION,
                "created_at": iso_time(timespec="seconds"),
                "model": self.info.as_dict(),
                "model_sha256": sha,
                "layers": list(self.layers),
                "dims": {layer: self.info.dim(layer) for layer in self.layers},
                "metric": (scorer_state or {}).get("config", {}).get("metric", self.metric or "euclidean"),
                "counts": {d: self.count_raw(d) for d in DOMAINS},
                "counts_searched": {d: self.count(d) for d in DOMAINS},
                "names": self.names,
                "mixup": None if self.mixup is None else self.mixup.as_dict(),
                "files": {rel: {"shape": list(self._raw[rel.split("/")[1][:-4]][rel.split("/")[0]].shape),
                                "dtype": "float32", "sha256": hashlib.sha256(data).hexdigest()}
                          for rel, data in files.items()},
                "content_hash": _content_hash(files),
                "indexes": index_meta,
                "scorer_state": scorer_state,
                "threshold": threshold,
            }
            try:
                text = json.dumps(doc, indent=1, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise BankError(f"{dest / BANK_JSON}: scorer state or threshold is not JSON: {exc}") from None
            write_synced(tmp / BANK_JSON, text.encode())
            for sub in (tmp / layer for layer in self.layers):
                fsync_path(sub)
        self.path, self.scorer_state, self.threshold, self.model_sha256 = dest, scorer_state, threshold, sha
        return dest

    def _check_index(self, layer: str, domain: str, index: HnswIndex) -> None:
        refs = self.get(layer, domain)
        if not isinstance(index, HnswIndex) or index.refs.shape != refs.shape or not np.array_equal(index.refs, refs):
            raise BankError(f"the index given for {layer}/{domain} was not built on this bank's refs")

    # --- load ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike[str], expect: ModelInfo | None = None,
             model_sha256: str | None = None) -> MemoryBank:
        """Read and validate a bank; BankError / ModelMismatchError name the file and the fault.

        expect: the model the bank will be used with (refused if incompatible); model_sha256: the
        ONNX file's hash, refused if the bank records a different one.
        """
        path = Path(directory)
        bank = read_directory_consistently(path, lambda fd: _Reader(path, fd).read(), "memory bank")
        if expect is not None:
            expect.require_compatible(bank.info, f"memory bank {path}")
            for layer in bank.layers:
                if layer not in expect.layers or expect.dim(layer) != bank.info.dim(layer):
                    raise ModelMismatchError(f"memory bank {path}: layer {layer} ({bank.info.dim(layer)}-d) "
                                             f"is not an output of the model ({expect.variant})")
        if model_sha256 and bank.model_sha256 and model_sha256 != bank.model_sha256:
            raise ModelMismatchError(f"memory bank {path} was built with model sha256 {bank.model_sha256[:12]}…, "
                                     f"the model given has {model_sha256[:12]}…")
        return bank


class _Reader:
    """Reads one bank through a directory fd, so a concurrent swap cannot mix two banks' files."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def _bytes(self, rel: str) -> bytes:
        try:
            fd = os.open(rel, os.O_RDONLY, dir_fd=self.fd)
        except FileNotFoundError:
            raise BankError(f"{self.path / rel}: missing") from None
        except OSError as exc:
            raise BankError(f"{self.path / rel}: cannot open: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def _fail(self, rel: str, what: str) -> BankError:
        return BankError(f"{self.path / rel}: {what}")

    def read(self) -> MemoryBank:
        raw = self._bytes(BANK_JSON)
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(BANK_JSON, f"not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise self._fail(BANK_JSON, "top level is not an object")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise self._fail(BANK_JSON, f"format_version is {version!r}; this agent reads {FORMAT_VERSION}")
        try:
            return self._build(doc)
        except EdgeAsdError as exc:
            if isinstance(exc, BankError) and str(self.path) in str(exc):
                raise
            raise self._fail(BANK_JSON, str(exc)) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._fail(BANK_JSON, f"malformed ({type(exc).__name__}: {exc})") from None

    def _build(self, doc: dict[str, Any]) -> MemoryBank:
        info = ModelInfo.from_dict(doc["model"])
        layers = [str(x) for x in doc["layers"]]
        counts = {d: int(doc["counts"][d]) for d in DOMAINS}
        for domain, count in counts.items():
            if not 0 <= count <= MAX_REFS:
                raise self._fail(BANK_JSON, f"counts.{domain} is {count}; a bank holds 0 to {MAX_REFS} refs per domain")
        files: dict[str, bytes] = {}
        embeddings: dict[str, dict[str, np.ndarray]] = {d: {} for d in DOMAINS}
        for layer in layers:
            if not _SAFE_NAME.match(layer):
                raise self._fail(BANK_JSON, f"layer name {layer!r} is not a plain name")
            dim = info.dim(layer)
            if int(doc["dims"][layer]) != dim:
                raise self._fail(BANK_JSON, f"dims.{layer} = {doc['dims'][layer]} but the model says {dim}")
            for domain in DOMAINS:
                rel = f"{layer}/{domain}.npy"
                data = self._bytes(rel)
                meta = doc["files"][rel]
                if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise self._fail(rel, f"content does not match bank.json (sha256 differs; {len(data)} "
                                          "bytes: truncated or overwritten?)")
                arr = self._parse_npy(rel, data)
                want = (counts[domain], dim)
                if arr.shape != want or [int(v) for v in meta["shape"]] != list(want):
                    raise self._fail(rel, f"shape {list(arr.shape)}, bank.json says {list(want)}")
                if arr.dtype != np.float32:
                    raise self._fail(rel, f"dtype {arr.dtype}, expected float32")
                files[rel] = data
                embeddings[domain][layer] = arr
        if _content_hash(files) != doc["content_hash"]:
            raise self._fail(BANK_JSON, "content_hash does not match the .npy files")
        mix = doc.get("mixup")
        mixup = None if mix is None else MixupSpec(float(mix["lam"]), int(mix["k"]))
        names = {d: [str(n) for n in doc["names"][d]] for d in DOMAINS}
        bank = MemoryBank(info, embeddings, names, mixup)
        bank.path = self.path
        bank.created_at = str(doc["created_at"])
        bank.model_sha256 = doc.get("model_sha256")
        bank.metric = str(doc.get("metric", "euclidean"))
        bank.scorer_state = doc.get("scorer_state")
        bank.threshold = doc.get("threshold")
        for rel, meta in (doc.get("indexes") or {}).items():
            bank.stored_indexes[(meta["layer"], meta["domain"])] = self._index(bank, rel, meta)
        return bank

    def _parse_npy(self, rel: str, data: bytes) -> np.ndarray:
        try:
            return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise self._fail(rel, f"not a readable .npy file ({exc})") from None

    def _index(self, bank: MemoryBank, rel: str, meta: dict[str, Any]) -> StoredIndex:
        layer, domain = str(meta["layer"]), str(meta["domain"])
        if rel != f"{layer}/{domain}.hnsw" or layer not in bank.layers or domain not in DOMAINS:
            raise self._fail(BANK_JSON, f"index entry {rel!r} names an unknown layer/domain")
        data = self._bytes(rel)  # also proves the file exists
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise self._fail(rel, "HNSW index does not match bank.json (sha256 differs)")
        count = bank.count(domain)
        if int(meta["count"]) != count:
            raise self._fail(rel, f"index holds {meta['count']} refs, the bank has {count}")
        params = HnswParams(m=int(meta["params"]["m"]), ef_construction=int(meta["params"]["ef_construction"]),
                            ef_search=int(meta["params"]["ef_search"]), seed=int(meta["params"]["seed"]))
        proc = Path(f"/proc/self/fd/{self.fd}")
        where = proc / rel if proc.exists() else self.path / rel
        graph = HnswIndex.load(where, bank.get(layer, domain), "euclidean", params, str(self.path / rel)).graph
        return StoredIndex(graph, params, count)


def _content_hash(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\n")
        digest.update(hashlib.sha256(files[rel]).digest())
    return digest.hexdigest()
