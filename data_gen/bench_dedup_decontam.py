"""Benchmark: dedup (exact + MinHash-LSH + faiss embeddings) and decontamination (exact + n-gram +
embedding retrieval against AIME24/AIME25/MATH500/GPQA) end to end, embeddings included, on real text,
beside SemHash's ``self_deduplicate`` with the same model. Each (size, system) runs in a fresh process
so its wall time and peak memory (ru_maxrss) are its own.

Records recombine clauses (sentence pieces) of the four benchmarks' problems (deterministic, ``--seed``); 1% of them are
planted near-copies (light edits of an earlier record: a number changed, a word dropped, a prefix,
reformatting) and 200 are lightly edited benchmark problems, 200 distinct ones (decontamination), all
with known ids, so recall (and precision) of the planted copies is measured; "planted benchmark
problems left" counts those still in the output (neither flagged nor removed by dedup).

    python data_gen/bench_dedup_decontam.py --sizes 100000 1000000 --markdown              # static model
    python data_gen/bench_dedup_decontam.py --sizes 3000 --models embedded://all-minilm-l6-v2 embedded://minilm-l6-static --no-semhash --markdown
    python data_gen/bench_dedup_decontam.py --sweep 20000                                  # thresholds for a model

Needs SANDLAB_BENCHMARK_DIR (or Hub access) for the test sets; semhash for the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np

STATIC = "embedded://minilm-l6-static"
PLANTED_TEST = 200
SENTENCES_PER_RECORD = 6


def _sentences() -> list[str]:
    from sandlab.benchmarks import load_benchmark

    pool: list[str] = []
    for name in ("aime24", "aime25", "math500", "gpqa_diamond"):
        for item in load_benchmark(name):
            # clauses of 4-25 words (no long LaTeX/asy blocks that would dominate a mean-pooled embedding)
            pool += [c.strip() for c in re.split(r"(?<=[.,;:?!])\s+", item["problem"]) if 4 <= len(c.split()) <= 25]
    return sorted(set(pool))


def _edit(text: str, rng: np.random.Generator) -> str:
    """A light edit: a number changed, one word dropped, a prefix added, or reformatting."""
    words = text.split()
    kind = int(rng.integers(0, 4))
    if kind == 0:
        digits = [i for i, w in enumerate(words) if re.search(r"\d", w)]
        if digits:
            i = digits[int(rng.integers(0, len(digits)))]
            words[i] = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), words[i], count=1)
            return " ".join(words)
        kind = 1
    if kind == 1 and len(words) > 8:
        del words[int(rng.integers(1, len(words) - 1))]
        return " ".join(words)
    if kind == 2:
        return "Solve the following. " + text
    return "  " + text.replace(". ", ".\n")


def corpus(n: int, seed: int = 0) -> tuple[list[dict], set[str], set[str]]:
    """(records, ids of planted near-copies, ids of planted edited benchmark problems)."""
    from sandlab.benchmarks import load_benchmark

    rng = np.random.default_rng(seed)
    pool = np.array(_sentences(), dtype=object)
    picks = rng.integers(0, len(pool), size=(n, SENTENCES_PER_RECORD))
    texts = [" ".join(pool[row]) for row in picks]
    records = [{"id": f"r{k}", "problem": t} for k, t in enumerate(texts)]
    planted_dup: set[str] = set()
    n_dup = n // 100
    targets = rng.choice(np.arange(n // 2, n), size=n_dup, replace=False)
    for t in targets:
        src = int(rng.integers(0, n // 2))
        records[t] = {"id": f"dup{t}", "problem": _edit(texts[src], rng)}
        planted_dup.add(f"dup{t}")
    test = [it["problem"] for name in ("aime24", "aime25", "math500") for it in load_benchmark(name)]
    planted_test: set[str] = set()
    slots = rng.choice(np.setdiff1d(np.arange(n // 2), targets), size=min(PLANTED_TEST, n // 10), replace=False)
    # Distinct benchmark problems: two edits of one problem would be near-duplicates of each other, and
    # dedup removing one before decontamination sees it would count as a decontamination miss.
    sources = rng.choice(len(test), size=len(slots), replace=False)
    for j, (s, src) in enumerate(zip(slots, sources)):
        records[s] = {"id": f"test{j}", "problem": _edit(test[int(src)], rng)}
        planted_test.add(f"test{j}")
    return records, planted_dup, planted_test


def _scores(dropped_ids: set[str], planted: set[str]) -> dict:
    hit = len(dropped_ids & planted)
    return {"recall": round(hit / max(len(planted), 1), 4), "precision": round(hit / max(len(dropped_ids), 1), 4), "dropped": len(dropped_ids)}


def run_sandlab(n: int, model: str, seed: int, minhash: bool, threshold: float | None, decontam_threshold: float | None) -> dict:
    from sandlab.config import DecontamStage, DedupStage
    from sandlab.data_gen.decontam import decontaminate
    from sandlab.data_gen.dedup import dedup
    from sandlab.embeddings import embed

    start = time.perf_counter()
    records, planted_dup, planted_test = corpus(n, seed)
    made = time.perf_counter() - start
    embed(["warm up"], model=model)  # model load/build outside the timed part
    dedup_cfg = DedupStage(embedding_model=model, minhash=minhash, **({"threshold": threshold} if threshold else {}))
    decontam_cfg = DecontamStage(embedding_model=model, **({"embedding_threshold": decontam_threshold} if decontam_threshold else {}))
    start = time.perf_counter()
    kept, dropped = dedup(records, dedup_cfg)
    dedup_s = time.perf_counter() - start
    start = time.perf_counter()
    _, contaminated, _ = decontaminate(kept, decontam_cfg)
    decontam_s = time.perf_counter() - start
    dropped_ids = {d["id"] for d in dropped}
    flagged = {d["id"] for d in contaminated}
    return {
        "system": "sandlab", "model": model, "records": n, "threshold": dedup_cfg.threshold, "synthesize_s": round(made, 1),
        "dedup_s": round(dedup_s, 1), "decontam_s": round(decontam_s, 1), "total_s": round(dedup_s + decontam_s, 1),
        "dedup": _scores(dropped_ids, planted_dup), "decontam_recall": round(len(flagged & planted_test) / max(len(planted_test), 1), 4),
        # of the planted benchmark problems that dedup kept, i.e. that decontamination saw
        "decontam_recall_seen": round(len(flagged & planted_test) / max(len(planted_test - dropped_ids), 1), 4),
        "contaminated": len(flagged), "leaked": len(planted_test - flagged - dropped_ids), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def run_semhash(n: int, model: str, seed: int, threshold: float | None) -> dict:
    from model2vec import StaticModel
    from semhash import SemHash

    from sandlab.models import resolve_model_path

    start = time.perf_counter()
    records, planted_dup, _ = corpus(n, seed)
    made = time.perf_counter() - start
    encoder = StaticModel.from_pretrained(resolve_model_path(model))
    threshold = threshold or 0.9
    start = time.perf_counter()
    result = SemHash.from_records(records, columns=["problem"], model=encoder).self_deduplicate(threshold=threshold)
    dedup_s = time.perf_counter() - start
    dropped_ids = {d.record["id"] for d in result.filtered}
    return {
        "system": "semhash", "model": model, "records": n, "threshold": threshold, "synthesize_s": round(made, 1),
        "dedup_s": round(dedup_s, 1), "decontam_s": None, "total_s": round(dedup_s, 1), "dedup": _scores(dropped_ids, planted_dup),
        "decontam_recall": None, "decontam_recall_seen": None, "contaminated": None, "leaked": None, "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def sweep(n: int, model: str, seed: int) -> None:
    """Recall/precision of the embedding layer alone over cosine thresholds (planted near-copies)."""
    from sandlab.data_gen.dedup import embedding_duplicates
    from sandlab.embeddings import embed

    records, planted_dup, _ = corpus(n, seed)
    vectors = embed([r["problem"] for r in records], model=model)
    print(f"| {model} threshold | recall | precision | dropped |\n|---:|---:|---:|---:|")
    for t in (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.96):
        found = embedding_duplicates(vectors, threshold=t, k=10, ivf_min_records=20000, nprobe=8)
        s = _scores({records[i]["id"] for i in found}, planted_dup)
        print(f"| {t:.2f} | {s['recall']} | {s['precision']} | {s['dropped']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--models", nargs="+", default=[STATIC])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, help="dedup cosine (default: DedupStage's); also SemHash's (default 0.9)")
    parser.add_argument("--decontam-threshold", type=float, help="decontam cosine (default: DecontamStage's)")
    parser.add_argument("--no-minhash", action="store_true", help="sandlab dedup without the MinHash layer")
    parser.add_argument("--no-semhash", action="store_true")
    parser.add_argument("--sweep", type=int, metavar="N", help="threshold sweep on N records for --models, then exit")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("SYSTEM", "N", "MODEL"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.sweep:
        for model in args.models:
            sweep(args.sweep, model, args.seed)
        return
    if args.one:
        system, n, model = args.one[0], int(args.one[1]), args.one[2]
        if system == "sandlab":
            row = run_sandlab(n, model, args.seed, not args.no_minhash, args.threshold, args.decontam_threshold)
        else:
            row = run_semhash(n, model, args.seed, args.threshold)
        print(json.dumps(row))
        return
    rows = []
    passthrough = [f"--seed={args.seed}"] + (["--no-minhash"] if args.no_minhash else [])
    passthrough += [f"--threshold={args.threshold}"] if args.threshold else []
    passthrough += [f"--decontam-threshold={args.decontam_threshold}"] if args.decontam_threshold else []
    for n in args.sizes:
        for model in args.models:
            systems = ["sandlab"] + ([] if args.no_semhash or "static" not in model else ["semhash"])
            for system in systems:
                out = subprocess.run([sys.executable, __file__, "--one", system, str(n), model, *passthrough],
                                     capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"})
                if out.returncode != 0:
                    sys.exit(f"{system} at {n} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.markdown:
        print("| records | system | model | threshold | dedup s | decontam s | total s | near-copy recall | precision | "
              "decontam recall | of those dedup kept | contaminated | planted benchmark problems left | peak RSS GiB |")
        print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            d = r["dedup"]
            print(f"| {r['records']:,} | {r['system']} | {r['model'].removeprefix('embedded://')} | {r['threshold']} | {r['dedup_s']} | "
                  f"{r['decontam_s'] if r['decontam_s'] is not None else '-'} | {r['total_s']} | {d['recall']} | {d['precision']} | "
                  f"{r['decontam_recall'] if r['decontam_recall'] is not None else '-'} | {r['decontam_recall_seen'] if r.get('decontam_recall_seen') is not None else '-'} | {r['contaminated'] if r['contaminated'] is not None else '-'} | "
                  f"{r['leaked'] if r.get('leaked') is not None else '-'} | {r['peak_rss_gib']} |")


if __name__ == "__main__":
    main()
