"""Which nearest-neighbour search for ``EmbeddingIndex``: recall@10 and speed at 100k vectors.

    .venv/bin/python benchmarks/index.py --out benchmarks/results/index.json

Data: N = 100,000 L2-normalized float32 vectors, d = 256 (the embedding size), 1,000 held-out
queries from the same distribution, inner product (= cosine), k = 10, on two sets:

* ``random``: i.i.d. Gaussian directions, the worst case for ANN (no structure to exploit);
* ``clustered``: 1,000 random unit centres, each point a centre plus Gaussian noise of norm 0.75
  (cosine to its centre ~0.8), re-normalized; cluster sizes multinomial (~100 each). Queries are
  fresh points around the same centres. Closer to real embeddings, which have structure.

Methods (ground truth: faiss ``IndexFlatIP``, checked against the index's own exact path):

* exact: ``EmbeddingIndex(kind="exact").search_arrays`` (numpy, chunked) and faiss IndexFlatIP;
* faiss ``IndexHNSWFlat`` (inner product), M in {16, 32} x efConstruction in {40, 100}, plus
  index.py's defaults (M=32, efConstruction=200) built through ``EmbeddingIndex(kind="hnsw")``;
  efSearch swept over 16..256 (per call, through ``SearchParametersHNSW``, as index.py does);
* faiss ``IndexIVFFlat`` (inner product), nlist 316 (~sqrt N) and 1024, nprobe swept;
* hnswlib (space ``ip``), the same M x efConstruction grid, ef swept.

``--structured-grid reduced`` (the default) builds only M=16/efC=40, M=32/efC=100 and index.py's
defaults on the clustered set, to keep the run near 10 minutes; ``full`` runs every build there.

Threads: builds (HNSW graphs, IVF training / adding) use ``--build-threads`` (default 2); every
search timing uses ``--search-threads`` (default 1), for numpy's BLAS too (``threadpoolctl``).
Per configuration: build seconds, memory (the serialized index's size: faiss
``serialize_index``, hnswlib ``save_index``; exact: the stored vectors), queries per second for
one batch of 1,000 queries, single-query latency p50 / p99 (``--single`` queries, one call
each), and recall@10 against exact.

A second part times exact search alone (batch-1 latency p50 and batch-1000 throughput) over a
range of N, d = 256 (float32 and float16 storage) and d = 512, to find where exact search
crosses ``--latency-budget-ms`` (default 5 ms) per query: the row count from which HNSW is
worth its recall loss. It also builds index.py's default HNSW at N = 20,000 (its current
threshold) for comparison.

The machine may be shared: before each timed block the script waits (up to 5 s, 90 s in all) for
one CPU to be idle and records the busy fraction it saw (per row). Writes JSON and a PNG
(recall@10 vs QPS per dataset; exact latency vs N) beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from _machine import busy_fraction, cpu_name, write_results
from modalforge.index import EmbeddingIndex

K = 10
EF_SEARCH = (16, 32, 64, 128, 256)
HNSW_GRID = ((16, 40), (16, 100), (32, 40), (32, 100))
REDUCED_GRID = ((16, 40), (32, 100))
DEFAULTS = {"hnsw_m": 32, "ef_construction": 200, "ef_search": 128, "exact_threshold": 20_000}
IVF = ((316, (1, 2, 4, 8, 16, 32, 64)), (1024, (1, 2, 4, 8, 16, 32, 64, 128)))
SWEEP_N = (2_000, 5_000, 10_000, 20_000, 30_000, 50_000, 75_000, 100_000, 150_000)


# --------------------------------------------------------------------------- data


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(kind: str, n: int, nq: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return unit(rng.standard_normal((n, d), np.float32)), unit(
            rng.standard_normal((nq, d), np.float32)
        )
    centres = unit(rng.standard_normal((1000, d), np.float32))
    noise = 0.75 / np.sqrt(d)  # noise vector norm ~0.75 against a unit centre

    def around(m: int) -> np.ndarray:
        which = rng.integers(0, len(centres), size=m)
        return unit(centres[which] + noise * rng.standard_normal((m, d), np.float32))

    return around(n), around(nq)


# --------------------------------------------------------------------------- measurement


class Quiet:
    """Waits (at most ``max_wait`` s per block, ``budget`` s in all) for other processes to
    leave at least one CPU idle (busy fraction of all CPUs under ``threshold``; the searches use
    one thread) before a timed block, and remembers the busy fraction it last saw (this process
    is asleep then)."""

    def __init__(
        self, threshold: float = 0.55, max_wait: float = 5.0, budget: float = 90.0
    ) -> None:
        self.threshold, self.max_wait, self.budget = threshold, max_wait, budget
        self.seen: list[float] = []
        self.waited = 0.0

    def wait(self) -> float:
        start = time.perf_counter()
        busy = busy_fraction(0.2)
        limit = min(self.max_wait, max(0.0, self.budget - self.waited))
        while busy > self.threshold and time.perf_counter() - start < limit:
            busy = busy_fraction(0.5)
        self.waited += time.perf_counter() - start
        self.seen.append(busy)
        return busy

    def report(self) -> dict:
        seen = np.array(self.seen or [0.0])
        return {
            "blocks": len(self.seen),
            "busy_fraction_before_blocks_median": round(float(np.median(seen)), 3),
            "busy_fraction_before_blocks_max": round(float(seen.max()), 3),
            "blocks_started_busy": int((seen > self.threshold).sum()),
            "seconds_waited": round(self.waited, 1),
        }


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def timed_search(search, queries: np.ndarray, n_single: int, quiet: Quiet) -> dict:
    """``search(q) -> rows`` timed on the whole batch (best of 2 if under 1 s) and one query
    at a time over the first ``n_single`` queries."""
    quiet.wait()
    best, rows = np.inf, None
    for _ in range(2):
        t0 = time.perf_counter()
        rows = search(queries)
        best = min(best, time.perf_counter() - t0)
        if best > 1.0:
            break
    search(queries[:1])  # warm
    lat = []
    for i in range(n_single):
        q = queries[i : i + 1]
        t0 = time.perf_counter()
        search(q)
        lat.append(time.perf_counter() - t0)
    lat_ms = 1e3 * np.array(lat)
    return {
        "rows": rows,
        "qps_batch": round(len(queries) / best, 1),
        "latency_p50_ms": round(float(np.percentile(lat_ms, 50)), 4),
        "latency_p99_ms": round(float(np.percentile(lat_ms, 99)), 4),
    }


def faiss_bytes(index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def hnswlib_bytes(index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.bin"
        index.save_index(str(path))
        return path.stat().st_size


def row(dataset: str, method: str, params: dict, build_s: float | None, memory: int | None,
        timing: dict, truth: np.ndarray, busy: float) -> dict:  # fmt: skip
    out = {
        "dataset": dataset,
        "method": method,
        **params,
        "build_seconds": None if build_s is None else round(build_s, 2),
        "memory_mb": None if memory is None else round(memory / 2**20, 1),
        "recall_at_10": round(recall(timing["rows"], truth), 4),
        **{k: v for k, v in timing.items() if k != "rows"},
        "busy_before": round(busy, 3),
    }
    print(json.dumps(out), flush=True)
    return out


def run_dataset(name: str, x: np.ndarray, q: np.ndarray, args, quiet: Quiet) -> list[dict]:
    d = x.shape[1]
    rows: list[dict] = []
    # --- exact
    faiss.omp_set_num_threads(args.build_threads)
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    _, truth = flat.search(q, K)
    faiss.omp_set_num_threads(args.search_threads)
    timing = timed_search(lambda b, f=flat: f.search(b, K)[1], q, args.single, quiet)
    rows.append(row(name, "faiss_flat_ip", {}, 0.0, faiss_bytes(flat), timing, truth,
                    quiet.seen[-1]))  # fmt: skip
    del flat
    t0 = time.perf_counter()
    ids = [str(i) for i in range(len(x))]
    exact = EmbeddingIndex(ids, x, kind="exact")
    build_s = time.perf_counter() - t0
    timing = timed_search(lambda b, e=exact: e.search_arrays(b, K)[0], q, args.single, quiet)
    rows.append(row(name, "modalforge_exact", {}, build_s, exact.vectors.nbytes, timing, truth,
                    quiet.seen[-1]))  # fmt: skip
    del exact
    # --- faiss HNSW: the grid, then index.py's defaults through EmbeddingIndex
    grid = HNSW_GRID if name == "random" or args.structured_grid == "full" else REDUCED_GRID
    for m, efc in (*grid, (DEFAULTS["hnsw_m"], DEFAULTS["ef_construction"])):
        default = (m, efc) == (DEFAULTS["hnsw_m"], DEFAULTS["ef_construction"])
        faiss.omp_set_num_threads(args.build_threads)
        quiet.wait()
        t0 = time.perf_counter()
        if default:
            emb = EmbeddingIndex(ids, x, kind="hnsw")
            index = emb._hnsw  # the faiss graph it built (private: a benchmark may look)
        else:
            index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = efc
            index.add(x)
        build_s = time.perf_counter() - t0
        memory = faiss_bytes(index)
        faiss.omp_set_num_threads(args.search_threads)
        method = "faiss_hnsw_indexpy_defaults" if default else "faiss_hnsw"
        for ef in EF_SEARCH:
            params = faiss.SearchParametersHNSW(efSearch=ef)
            timing = timed_search(
                lambda b, p=params, ix=index: ix.search(b, K, params=p)[1], q, args.single, quiet
            )
            rows.append(row(name, method, {"M": m, "ef_construction": efc, "ef_search": ef},
                            build_s, memory, timing, truth, quiet.seen[-1]))  # fmt: skip
        if default:  # the whole public path: query checks, normalization, int64 copies
            timing = timed_search(lambda b, e=emb: e.search_arrays(b, K)[0], q, args.single, quiet)
            rows.append(row(name, "modalforge_hnsw_search_arrays",
                            {"M": m, "ef_construction": efc, "ef_search": emb.ef_search},
                            build_s, memory, timing, truth, quiet.seen[-1]))  # fmt: skip
            del emb
        del index
    # --- faiss IVF-Flat
    for nlist, probes in IVF:
        faiss.omp_set_num_threads(args.build_threads)
        quiet.wait()
        t0 = time.perf_counter()
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        index.train(x)
        index.add(x)
        build_s = time.perf_counter() - t0
        memory = faiss_bytes(index)
        faiss.omp_set_num_threads(args.search_threads)
        for nprobe in probes:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            timing = timed_search(
                lambda b, p=params, ix=index: ix.search(b, K, params=p)[1], q, args.single, quiet
            )
            rows.append(row(name, "faiss_ivf_flat", {"nlist": nlist, "nprobe": nprobe},
                            build_s, memory, timing, truth, quiet.seen[-1]))  # fmt: skip
        del index
    # --- hnswlib
    if args.hnswlib:
        import hnswlib

        for m, efc in grid:
            quiet.wait()
            t0 = time.perf_counter()
            index = hnswlib.Index(space="ip", dim=d)
            index.init_index(max_elements=len(x), M=m, ef_construction=efc, random_seed=0)
            index.add_items(x, np.arange(len(x)), num_threads=args.build_threads)
            build_s = time.perf_counter() - t0
            memory = hnswlib_bytes(index)
            for ef in EF_SEARCH:
                index.set_ef(max(ef, K))

                def search(b, index=index):
                    return index.knn_query(b, k=K, num_threads=args.search_threads)[0]

                timing = timed_search(search, q, args.single, quiet)
                rows.append(row(name, "hnswlib", {"M": m, "ef_construction": efc,
                                                  "ef_search": ef},
                                build_s, memory, timing, truth, quiet.seen[-1]))  # fmt: skip
            del index
    return rows, truth


# --------------------------------------------------------------------------- exact vs N


def exact_sweep(args, quiet: Quiet) -> list[dict]:
    """Exact search cost against N: batch-1 p50 and batch-1000 queries/s."""
    out = []
    for d, dtype in ((256, "float32"), (256, "float16"), (512, "float32")):
        if d == 512 and not args.d512:
            continue
        x, q = make_data("random", max(SWEEP_N), 1000, d, seed=1)
        for n in SWEEP_N:
            index = EmbeddingIndex([str(i) for i in range(n)], x[:n], dtype=dtype, kind="exact")
            timing = timed_search(lambda b, ix=index: ix.search_arrays(b, K)[0], q,
                                  args.single_exact, quiet)  # fmt: skip
            entry = {"dim": d, "dtype": dtype, "n": n, "method": "modalforge_exact",
                     **{k: v for k, v in timing.items() if k != "rows"}}  # fmt: skip
            if dtype == "float32":
                flat = faiss.IndexFlatIP(d)
                flat.add(x[:n])
                ft = timed_search(lambda b, f=flat: f.search(b, K)[1], q, args.single_exact,
                                  quiet)  # fmt: skip
                entry |= {"faiss_flat_qps_batch": ft["qps_batch"],
                          "faiss_flat_latency_p50_ms": ft["latency_p50_ms"]}  # fmt: skip
            print(json.dumps(entry), flush=True)
            out.append(entry)
            del index
    return out


def crossing(sweep: list[dict], d: int, dtype: str, budget_ms: float) -> float | None:
    """N where batch-1 p50 crosses ``budget_ms``, by linear interpolation between sweep points
    (latency is close to linear in N); None if it never does."""
    pts = [(e["n"], e["latency_p50_ms"]) for e in sweep if e["dim"] == d and e["dtype"] == dtype]
    for (n0, t0), (n1, t1) in itertools.pairwise(pts):
        if t0 <= budget_ms < t1:
            return round(n0 + (budget_ms - t0) * (n1 - n0) / (t1 - t0))
    return None


def hnsw_at_threshold(args, quiet: Quiet) -> dict:
    """index.py's default HNSW at N = its current threshold (20,000), random d=256."""
    n = DEFAULTS["exact_threshold"]
    x, q = make_data("random", n, 1000, 256, seed=2)
    faiss.omp_set_num_threads(args.build_threads)
    flat = faiss.IndexFlatIP(256)
    flat.add(x)
    _, truth = flat.search(q, K)
    quiet.wait()
    t0 = time.perf_counter()
    emb = EmbeddingIndex([str(i) for i in range(n)], x, kind="hnsw")
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(args.search_threads)
    hn = timed_search(lambda b: emb.search_arrays(b, K)[0], q, args.single, quiet)
    ex_index = EmbeddingIndex([str(i) for i in range(n)], x, kind="exact")
    ex = timed_search(lambda b: ex_index.search_arrays(b, K)[0], q, args.single, quiet)
    out = {
        "n": n,
        "dim": 256,
        "dataset": "random",
        "hnsw_build_seconds": round(build_s, 2),
        "hnsw_memory_mb": round(faiss_bytes(emb._hnsw) / 2**20, 1),
        "exact_memory_mb": round(ex_index.vectors.nbytes / 2**20, 1),
        "hnsw": {k: v for k, v in hn.items() if k != "rows"}
        | {"recall_at_10": round(recall(hn["rows"], truth), 4)},
        "exact": {k: v for k, v in ex.items() if k != "rows"}
        | {"recall_at_10": round(recall(ex["rows"], truth), 4)},
    }
    print("at threshold", json.dumps(out), flush=True)
    return out


# --------------------------------------------------------------------------- report


def plot(payload: dict, path: Path) -> None:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # mathtext fallbacks
    import matplotlib.pyplot as plt

    datasets = list(payload["datasets"])
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(5.2 * (len(datasets) + 1), 4.2))
    colors = {"faiss_hnsw": "tab:blue", "faiss_hnsw_indexpy_defaults": "tab:red",
              "hnswlib": "tab:green", "faiss_ivf_flat": "tab:orange"}  # fmt: skip
    styles = ("-", "--", ":", "-.")
    for ax, name in zip(axes, datasets, strict=False):
        rows = [r for r in payload["results"] if r["dataset"] == name]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["method"] in colors:
                key = (r["method"], r.get("M"), r.get("ef_construction"), r.get("nlist"))
                groups.setdefault(key, []).append(r)
        seen: dict[str, int] = {}
        for (method, m, efc, nlist), group in groups.items():
            i = seen.setdefault(method, 0)
            seen[method] += 1
            label = (f"{method} nlist={nlist}" if nlist
                     else f"{method} M={m} efC={efc}")  # fmt: skip
            ax.plot([r["recall_at_10"] for r in group], [r["qps_batch"] for r in group],
                    styles[i % 4], marker="o", ms=3, color=colors[method], label=label,
                    lw=1)  # fmt: skip
        for r in rows:
            if r["method"] in ("modalforge_exact", "faiss_flat_ip"):
                marker = "*" if r["method"] == "modalforge_exact" else "s"
                ax.plot(1.0, r["qps_batch"], marker, color="black", ms=8,
                        label=r["method"])  # fmt: skip
        if min(r["recall_at_10"] for r in rows) >= 0.8:  # spread the nines
            ax.set_xscale("function", functions=(
                lambda v: -np.log10(np.clip(1.0001 - v, 1e-4, 1)),
                lambda v: 1.0001 - 10 ** (-v)))  # fmt: skip
            ax.set_xticks([0.8, 0.9, 0.95, 0.99, 0.999, 1.0], ["0.8", "0.9", "0.95", "0.99",
                                                                  "0.999", "1"])  # fmt: skip
            ax.set_xlim(0.8, 1.0001)
        else:
            ax.set_xlim(0, 1.02)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel(f"queries/s (batch 1000, {payload['settings']['search_threads']} thread)")
        ax.set_title(f"{name}: N=100k, d=256, k=10", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=5.5, loc="upper right" if name == "random" else "lower left")
    ax = axes[-1]
    sweep = payload["exact_sweep"]
    for (d, dtype), color in (((256, "float32"), "tab:blue"), ((256, "float16"), "tab:cyan"),
                              ((512, "float32"), "tab:purple")):  # fmt: skip
        pts = [e for e in sweep if e["dim"] == d and e["dtype"] == dtype]
        if pts:
            ax.plot([e["n"] for e in pts], [e["latency_p50_ms"] for e in pts], "o-", ms=3,
                    color=color, label=f"EmbeddingIndex exact d={d} {dtype}")  # fmt: skip
        if dtype == "float32" and pts:
            ax.plot([e["n"] for e in pts], [e["faiss_flat_latency_p50_ms"] for e in pts], "x:",
                    color=color, label=f"faiss IndexFlatIP d={d}")  # fmt: skip
    budget = payload["settings"]["latency_budget_ms"]
    ax.axhline(budget, color="grey", ls="--", lw=0.8, label=f"{budget:g} ms")
    ax.axvline(DEFAULTS["exact_threshold"], color="tab:red", ls=":", lw=0.8,
               label="index.py threshold (20k)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (rows)")
    ax.set_ylabel("batch-1 latency p50 (ms)")
    ax.set_title("exact search, one query per call", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(results: list[dict], target: float = 0.95) -> dict:
    """Per dataset and configuration: the fastest sweep point reaching ``target`` recall."""
    out: dict = {}
    for r in results:
        if r["recall_at_10"] < target:
            continue
        key = f"{r['dataset']}/{r['method']}" + (
            f"/nlist={r['nlist']}" if "nlist" in r
            else f"/M={r['M']},efC={r['ef_construction']}" if "M" in r else ""
        )  # fmt: skip
        if key not in out or r["qps_batch"] > out[key]["qps_batch"]:
            out[key] = {k: r.get(k) for k in ("ef_search", "nprobe", "recall_at_10",
                                               "qps_batch", "latency_p50_ms", "build_seconds",
                                               "memory_mb") if r.get(k) is not None}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/index.json"))
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--single", type=int, default=300, help="queries timed one by one")
    parser.add_argument("--single-exact", type=int, default=100,
                        help="queries timed one by one in the exact-vs-N sweep")  # fmt: skip
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--search-threads", type=int, default=1)
    parser.add_argument("--structured-grid", choices=("reduced", "full"), default="reduced")
    parser.add_argument("--datasets", default="random,clustered")
    parser.add_argument("--latency-budget-ms", type=float, default=5.0)
    parser.add_argument("--no-hnswlib", dest="hnswlib", action="store_false")
    parser.add_argument("--no-d512", dest="d512", action="store_false",
                        help="skip d=512 in the exact-vs-N sweep")  # fmt: skip
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from --out")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    start = time.perf_counter()
    quiet = Quiet()
    hnswlib_version = None
    if args.hnswlib:
        try:
            from importlib.metadata import version

            import hnswlib  # noqa: F401

            hnswlib_version = version("hnswlib")
        except ImportError:
            print("hnswlib is not installed: skipped", flush=True)
            args.hnswlib = False
    load_before = os.getloadavg()
    # numpy's BLAS (the exact path's matrix product) gets the search thread count throughout;
    # faiss' OpenMP is switched between build and search threads explicitly
    with threadpool_limits(limits=args.search_threads):
        results, datasets = [], {}
        for name in args.datasets.split(","):
            x, q = make_data(name, args.n, args.queries, args.dim)
            t0 = time.perf_counter()
            rows, truth = run_dataset(name, x, q, args, quiet)
            results.extend(rows)
            exact_rows = EmbeddingIndex([str(i) for i in range(len(x))], x, kind="exact")
            own = exact_rows.search_arrays(q, K)[0]
            datasets[name] = {
                "n": len(x),
                "dim": x.shape[1],
                "queries": len(q),
                "seconds": round(time.perf_counter() - t0, 1),
                # same top-10 sets from the index's exact path as from faiss IndexFlatIP
                "exact_path_vs_faiss_flat_recall": round(recall(own, truth), 6),
                "mean_top1_cosine": round(float((q * x[truth[:, 0]]).sum(1).mean()), 4),
                "mean_top10_cosine": round(float((q * x[truth[:, -1]]).sum(1).mean()), 4),
            }
            del x, q, exact_rows
        sweep = exact_sweep(args, quiet)
        at_threshold = hnsw_at_threshold(args, quiet)
    budget = args.latency_budget_ms
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": cpu_name(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "faiss": faiss.__version__,
            "hnswlib": hnswlib_version,
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {
            "k": K,
            "metric": "inner product on L2-normalized vectors (cosine)",
            "indexpy_defaults": DEFAULTS,
        },
        "quiet": quiet.report(),
        "datasets": datasets,
        "results": results,
        "fastest_at_recall_0.95": summarize(results, 0.95),
        "fastest_at_recall_0.99": summarize(results, 0.99),
        "exact_sweep": sweep,
        "exact_crossing_n": {
            f"d{d}_{dtype}": crossing(sweep, d, dtype, budget)
            for d, dtype in ((256, "float32"), (256, "float16"), (512, "float32"))
        },
        "hnsw_at_current_threshold": at_threshold,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    png = write_results(args.out, payload, plot)
    print(f"wrote {args.out} and {png} in {payload['total_seconds']} s")


if __name__ == "__main__":
    main()
