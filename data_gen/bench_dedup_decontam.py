"""Benchmark: dedup (exact + MinHash-LSH + faiss embeddings) and decontamination (exact + n-gram +
embedding retrieval against AIME24/AIME25/MATH500/GPQA) on synthetic records with precomputed
embeddings, at growing sizes. Each size runs in a fresh process so its peak memory is its own.

    python data_gen/bench_dedup_decontam.py --sizes 10000 100000 1000000 --markdown

Needs SANDLAB_BENCHMARK_DIR (or Hub access) for the test sets.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

DIM = 384  # all-MiniLM-L6-v2


def synthetic(n: int, seed: int = 0):
    """n records: 5% reformatted exact copies, 5% one-word edits, 5% paraphrase-like vector copies,
    and 80 planted benchmark problems (50 MATH500 + 30 AIME24; half verbatim, half wrapped in extra text)."""
    from sandlab.benchmarks import load_benchmark

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20000)])
    words = vocab[rng.integers(0, len(vocab), size=(n, 30))]
    texts = [" ".join(row) + f" find {k}." for k, row in enumerate(words)]
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    block = n // 20
    src = rng.integers(0, n - 3 * block - 100, size=3 * block)
    for j, s in enumerate(src[:block]):  # exact copies, reformatted
        texts[n - 1 - j] = "  " + texts[s].upper()
    for j, s in enumerate(src[block : 2 * block]):  # one word changed
        texts[n - 1 - block - j] = texts[s].replace(words[s][3], "changed", 1)
    for j, s in enumerate(src[2 * block :]):  # vector near-copies
        vectors[n - 1 - 2 * block - j] = vectors[s] + 0.05 * rng.normal(size=DIM)
    test = [it["problem"] for it in load_benchmark("math500")[:50] + load_benchmark("aime24")]
    for j, problem in enumerate(test):
        texts[j] = problem if j % 2 else f"Consider this. {problem} Answer with a number."
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [{"id": f"r{k}", "problem": t} for k, t in enumerate(texts)], vectors


def run_one(n: int) -> dict:
    from sandlab.config import DecontamStage, DedupStage
    from sandlab.data_gen.decontam import decontaminate
    from sandlab.data_gen.dedup import dedup

    start = time.perf_counter()
    records, vectors = synthetic(n)
    made = time.perf_counter() - start
    start = time.perf_counter()
    kept, dropped = dedup(records, DedupStage(), vectors=vectors)
    dedup_s = time.perf_counter() - start
    reasons: dict[str, int] = {}
    for d in dropped:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    start = time.perf_counter()
    _, contaminated, report = decontaminate(records, DecontamStage(), vectors=vectors)
    decontam_s = time.perf_counter() - start
    return {
        "records": n, "synthesize_s": round(made, 1), "dedup_s": round(dedup_s, 1), "dedup_dropped": reasons,
        "decontam_s": round(decontam_s, 1), "contaminated": len(contaminated),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"size {n} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    if args.markdown:
        print("| records | dedup s | dropped (exact / minhash / embedding) | decontam s | contaminated | peak RSS GiB |")
        print("|---:|---:|---|---:|---:|---:|")
        for r in rows:
            d = r["dedup_dropped"]
            print(f"| {r['records']:,} | {r['dedup_s']} | {d.get('exact_duplicate', 0):,} / {d.get('minhash_duplicate', 0):,} / "
                  f"{d.get('near_duplicate', 0):,} | {r['decontam_s']} | {r['contaminated']} | {r['peak_rss_gib']} |")


if __name__ == "__main__":
    main()
