"""Memory-bank search: exact numpy vs HNSW (hnswlib) by bank size and dimension; ld-domain candidates.

    .venv/bin/python bench/banks.py [--sizes 1000,4000,10000,100000,1000000] [--dims 768,6144]
                                    [--json-dir bench/results]

Study A (per N x D): build time, query time at batch 1 (median per query) and batch 256 (per
query), recall@1 of HNSW against exact search, resident memory added by the index. Both indexes
are the runtime's (edge_agent.scoring.knn), with the scoring defaults (M 16, ef_construction 200,
ef_search 256, one build thread). Banks that do not fit in memory are skipped with the number;
an HNSW build that would exceed --build-budget seconds is time-boxed: the insertion rate of its
last chunk is extrapolated to the full size and labelled as such.
Study B: ef_search sweep (recall@1, ms/query) at the largest fitted size per dimension.
Study C: ld-domain min_y d(x, y) / b(y): the HNSW candidate path vs exact search, as a function of
`candidates` M, on clustered banks and on real mn04 embeddings of synthetic machine clips.

Data: clustered vectors (50 clusters, per-cluster spread; queries drawn from the same clusters,
not from the refs): embeddings of machine sound are clustered by operating condition.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import benchlib
import hnswlib
import numpy as np

from edge_agent.scoring.knn import ExactIndex, HnswIndex, HnswParams, cap_k
from edge_agent.scoring.normalizers import floor_b, min_ratio

BATCH_MANY = 256
QUERIES_1 = 30


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def clustered(n: int, dim: int, seed: int, clusters: int = 50, chunk: int = 50_000) -> np.ndarray:
    """Memory-lean clustered data (generated in chunks, float32 throughout)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345 + dim).standard_normal((clusters, dim)).astype(np.float32)
    spread = np.random.default_rng(54321 + dim).uniform(0.2, 0.6, clusters).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        which = rng.integers(0, clusters, stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = centres[which] + spread[which, None] * noise
    return out


def per_query_ms(index: Any, queries: np.ndarray, k: int = 1) -> tuple[float, float]:
    """(median ms of single-row queries, ms per query of one batched call)."""
    rows = iter(range(10**9))
    one = benchlib.timings(lambda: index.query(queries[next(rows) % QUERIES_1][None], k), QUERIES_1, warmup=2)
    t0 = time.perf_counter()
    index.query(queries[:BATCH_MANY], k)
    many = (time.perf_counter() - t0) / BATCH_MANY
    return float(np.median(one) * 1e3), many * 1e3


def timed_hnsw_build(refs: np.ndarray, params: HnswParams, budget_s: float) -> tuple[HnswIndex | None, dict]:
    """The runtime's HnswIndex if it builds within budget; else the measured rate, extrapolated."""
    n = len(refs)
    chunk = 5_000
    graph = hnswlib.Index(space="l2", dim=refs.shape[1])
    graph.init_index(max_elements=n, ef_construction=params.ef_construction, M=params.m, random_seed=params.seed)
    t0 = time.perf_counter()
    rate = 0.0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        c0 = time.perf_counter()
        graph.add_items(refs[start:stop], np.arange(start, stop), num_threads=params.build_threads)
        rate = (stop - start) / (time.perf_counter() - c0)
        if time.perf_counter() - t0 > budget_s and stop < n:
            done = stop
            elapsed = time.perf_counter() - t0
            return None, {"build_s": elapsed + (n - done) / rate, "extrapolated": True, "inserted": done,
                          "inserted_s": elapsed, "last_rate_per_s": rate}
    build_s = time.perf_counter() - t0
    return HnswIndex(refs, "euclidean", params, graph=graph), {"build_s": build_s, "extrapolated": False,
                                                               "last_rate_per_s": rate}


def study_sizes(sizes: list[int], dims: list[int], budget_s: float, params: HnswParams) -> list[dict]:
    rows = []
    for dim in dims:
        for n in sizes:
            f32 = n * dim * 4
            # exact search caches refs in float64 (peak: refs + 2x refs); HNSW is built after it is freed.
            need = f32 * 3 + n * params.m * 2 * 4
            row: dict[str, Any] = {"n": n, "dim": dim, "refs_gb": f32 / 1e9}
            if need > 0.7 * available_bytes():
                row["skipped"] = (f"needs ~{need / 1e9:.1f} GB (refs {f32 / 1e9:.1f} GB float32), "
                                  f"{available_bytes() / 1e9:.1f} GB available")
                print(f"skip N={n} D={dim}: {row['skipped']}", flush=True)
                rows.append(row)
                continue
            refs = clustered(n, dim, seed=1)
            queries = clustered(BATCH_MANY, dim, seed=2)
            base = rss_bytes()
            t0 = time.perf_counter()
            exact = ExactIndex(refs, "euclidean")
            exact.query(queries[:1], 1)  # builds the float64 cache the exact path keeps
            row["exact_build_s"] = time.perf_counter() - t0
            row["exact_mem_gb"] = (rss_bytes() - base) / 1e9
            row["exact_q1_ms"], row["exact_qmany_ms"] = per_query_ms(exact, queries)
            _, truth = exact.query(queries, 1)
            del exact
            gc.collect()
            base = rss_bytes()
            hnsw, build = timed_hnsw_build(refs, params, budget_s)
            row.update({f"hnsw_{k}": v for k, v in build.items()})
            row["hnsw_mem_gb"] = (rss_bytes() - base) / 1e9
            if hnsw is not None:
                row["hnsw_q1_ms"], row["hnsw_qmany_ms"] = per_query_ms(hnsw, queries)
                _, got = hnsw.query(queries, 1)
                row["recall_at_1"] = float(np.mean(got[:, 0] == truth[:, 0]))
                row["speedup_q1"] = row["exact_q1_ms"] / row["hnsw_q1_ms"]
                row["speedup_qmany"] = row["exact_qmany_ms"] / row["hnsw_qmany_ms"]
                row["ef_sweep"] = ef_sweep(hnsw, queries, truth)
            rows.append(row)
            print(f"done N={n} D={dim}: {({k: v for k, v in row.items() if k != 'ef_sweep'})}", flush=True)
            del hnsw, refs
            gc.collect()
    return rows


def ef_sweep(index: HnswIndex, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
    out = []
    original = index.params
    for ef in (16, 32, 64, 128, 256):
        index.params = HnswParams(m=original.m, ef_construction=original.ef_construction, ef_search=ef,
                                  seed=original.seed)
        q1, _ = per_query_ms(index, queries)
        _, got = index.query(queries, 1)
        out.append({"ef_search": ef, "recall_at_1": float(np.mean(got[:, 0] == truth[:, 0])), "q1_ms": q1})
    index.params = original
    return out


def ratio_agreement(refs: np.ndarray, queries: np.ndarray, ms: list[int], k: int, params: HnswParams) -> list[dict]:
    """Candidate path vs exact min ratio; b from exact search (as the normalizer fits it)."""
    exact = ExactIndex(refs, "euclidean")
    b, _ = floor_b(exact.query_loo(cap_k(k, len(refs), True))[0].mean(axis=1), "bench")
    want = min_ratio(exact, b, queries, 1)
    exact_ms = float(np.median(benchlib.timings(lambda: min_ratio(exact, b, queries[:1], 1), 10)) * 1e3)
    hnsw = HnswIndex(refs, "euclidean", params)
    out = []
    for m in ms:
        got = min_ratio(hnsw, b, queries, m)
        rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
        t = float(np.median(benchlib.timings(lambda m=m: min_ratio(hnsw, b, queries[:1], m), 10)) * 1e3)
        out.append({"candidates": m, "match_rate": float(np.mean(rel <= 1e-6)),
                    "mean_rel_err": float(rel.mean()), "max_rel_err": float(rel.max()), "q1_ms": t,
                    "exact_q1_ms": exact_ms})
    return out


def mn04_embeddings(n_refs: int, n_queries: int) -> tuple[np.ndarray, np.ndarray, str]:
    """layer_11 of the real mn04 on synthetic fan/pump/gearbox source-domain clips (normal)."""
    from edge_agent.evaluation.synthetic import machine_type, normal_sound
    from edge_agent.model.encoder import Encoder

    enc = Encoder(benchlib.model_path("mn04"), providers=("cpu",))
    layer = enc.info.default_layers[0]
    rng = np.random.default_rng(7)
    machines = ("fan", "pump", "gearbox")
    rows = []
    batch = []
    for i in range(n_refs + n_queries):
        audio = normal_sound(machine_type(machines[i % 3]), "source", 10.0, rng).astype(np.float32)
        batch.append(enc.prepare(0.1 * audio, 16_000))
        if len(batch) == 16 or i == n_refs + n_queries - 1:
            rows.append(enc.embed(np.stack(batch))[layer])
            batch = []
    emb = np.concatenate(rows)
    return emb[:n_refs], emb[n_refs:], f"mn04 {layer} ({emb.shape[1]}-d)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,4000,10000,100000,1000000")
    parser.add_argument("--dims", default="768,6144")
    parser.add_argument("--build-budget", type=float, default=240.0, help="seconds per HNSW build before "
                        "extrapolating")
    parser.add_argument("--ratio-refs", type=int, default=10_000)
    parser.add_argument("--mn04-refs", type=int, default=1500, help="real mn04 embeddings (0: skip)")
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument("--json-name", default="banks", help="file name (without .json) under --json-dir")
    parser.add_argument("--print-json", type=Path, default=None, help="re-print the tables of a saved run")
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    if args.print_json:
        print_tables(json.loads(args.print_json.read_text()))
        return
    info = benchlib.machine()
    print(f"machine: {benchlib.machine_line(info)}\n", flush=True)
    params = HnswParams()
    results: dict[str, Any] = {"machine": info, "hnsw": params.as_dict()}
    sizes = [int(s) for s in args.sizes.split(",") if s]
    dims = [int(d) for d in args.dims.split(",") if d]
    if not args.skip_sizes:
        results["sizes"] = study_sizes(sizes, dims, args.build_budget, params)
    ms = [8, 16, 32, 64, 128, 256]
    ratio: dict[str, list[dict]] = {}
    for dim in dims:
        refs = clustered(args.ratio_refs, dim, seed=3)
        queries = clustered(200, dim, seed=4)
        ratio[f"clustered {args.ratio_refs} x {dim}"] = ratio_agreement(refs, queries, ms, 16, params)
        print(f"done ratio D={dim}", flush=True)
    if args.mn04_refs:
        refs, queries, label = mn04_embeddings(args.mn04_refs, 200)
        ratio[f"{label}, {args.mn04_refs} refs (exact_below set to 0: HNSW forced)"] = ratio_agreement(
            refs, queries, ms, 16, params)
    results["ratio"] = ratio
    print_tables(results)
    benchlib.write_json(args.json_name, results, args.json_dir)


def index_gb(n: int, dim: int, kind: str, m: int) -> float:
    """Resident size of an index: exact = float32 refs + the float64 copy its queries cache;
    HNSW = hnswlib's level-0 storage (vector, 2M links, count, label) + the runtime's float32 refs.
    (RSS growth measured around each build is in the JSON; freed arrays make it unreliable.)"""
    if kind == "exact":
        return n * dim * 12 / 1e9
    return n * (dim * 4 + 2 * m * 4 + 4 + 8 + dim * 4) / 1e9


def print_tables(results: dict[str, Any]) -> None:
    if "sizes" in results:
        print("\n### Exact vs HNSW search (k = 1; ms per query; index size computed, see index_gb)\n")
        rows = []
        for r in results["sizes"]:
            if "skipped" in r:
                rows.append([r["n"], r["dim"], f"{r['refs_gb']:.2f}", f"skipped: {r['skipped']}",
                             *([""] * 7), f"{index_gb(r['n'], r['dim'], 'exact', results['hnsw']['m']):.3g} / "
                             f"{index_gb(r['n'], r['dim'], 'hnsw', results['hnsw']['m']):.3g}"])
                continue
            build = f"{r['hnsw_build_s']:.1f}" + (f" (extrapolated from {r['hnsw_inserted']} refs in "
                                                   f"{r['hnsw_inserted_s']:.0f} s)" if r["hnsw_extrapolated"] else "")
            hn = r.get("hnsw_q1_ms")
            rows.append([r["n"], r["dim"], f"{r['refs_gb']:.2f}", f"{r['exact_build_s']:.2f}", build,
                         r["exact_q1_ms"], "" if hn is None else hn, r["exact_qmany_ms"],
                         "" if hn is None else r["hnsw_qmany_ms"],
                         "" if hn is None else f"{r['speedup_q1']:.1f}x",
                         "" if hn is None else f"{r['recall_at_1']:.3f}",
                         f"{index_gb(r['n'], r['dim'], 'exact', results['hnsw']['m']):.3g} / "
                         f"{index_gb(r['n'], r['dim'], 'hnsw', results['hnsw']['m']):.3g}"])
        print(benchlib.table(["N", "D", "refs GB", "exact build s", "HNSW build s", "exact ms (b=1)",
                              "HNSW ms (b=1)", f"exact ms/q (b={BATCH_MANY})", f"HNSW ms/q (b={BATCH_MANY})",
                              "speed-up b=1", "recall@1", "index GB exact / HNSW"], rows))
        print("\n### HNSW ef_search sweep (recall@1 / ms per query at batch 1)\n")
        rows = []
        for r in results["sizes"]:
            if r.get("ef_sweep") and r["n"] >= 10_000:
                rows.append([r["n"], r["dim"], *(f"{e['recall_at_1']:.3f} / {e['q1_ms']:.3g}" for e in r["ef_sweep"])])
        efs = [e["ef_search"] for e in next((r["ef_sweep"] for r in results["sizes"] if r.get("ef_sweep")), [])]
        print(benchlib.table(["N", "D", *(f"ef {e}" for e in efs)], rows))
    print("\n### ld-domain ratio: HNSW candidates vs exact (share of 200 queries equal to 1e-6; ms/query)\n")
    rows = []
    for label, entries in results["ratio"].items():
        for e in entries:
            rows.append([label, e["candidates"], f"{e['match_rate']:.3f}", e["mean_rel_err"], e["max_rel_err"],
                         e["q1_ms"], e["exact_q1_ms"]])
    print(benchlib.table(["bank", "candidates M", "match rate", "mean rel err", "max rel err",
                          "HNSW path ms (b=1)", "exact ms (b=1)"], rows))


if __name__ == "__main__":
    main()
