"""Benchmark: the run's embedding store (``data.embedding_store``) on the stages that embed problems,
in a run's order: dedup -> decontam -> (a third dropped, as solving and filtering would) -> novelty ->
diversity, then the same run resumed with diversity's output deleted. Store on vs off on the same
records in one process, the model loaded and the test sets' embeddings cached before any timing.

Records are those of bench_dedup_decontam.py (recombined benchmark clauses, planted copies).

    python data_gen/bench_embedding_store.py --records 2000                      # MiniLM, the default model
    python data_gen/bench_embedding_store.py --records 100000 --model embedded://minilm-l6-static

Needs SANDLAB_BENCHMARK_DIR (or Hub access) for the test sets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
BENCHMARKS = ("aime24", "aime25", "math500", "gpqa_diamond")


def run(records: list[dict], model: str, store: bool, workdir: Path, novelty_corpus: Path) -> dict:
    from sandlab import embeddings
    from sandlab.launch.cli import compose_recipe
    from sandlab.launch.data_stages import apply_stage
    from sandlab.runs import RunDir
    from sandlab.stages import StageContext, get_stage, load_recipe

    embedded = {"texts": 0}
    real_load, real_static = embeddings._load, embeddings.encode_static

    class Counting:  # the texts the model itself encodes
        def __init__(self, encoder):
            self.encoder = encoder

        def encode(self, texts, **kwargs):
            embedded["texts"] += len(texts)
            return self.encoder.encode(texts, **kwargs)

    embeddings._load = lambda path, device="cpu": Counting(real_load(path, device))
    embeddings.encode_static = lambda m, texts, **kw: embedded.__setitem__("texts", embedded["texts"] + len(texts)) or real_static(m, texts, **kw)
    embeddings._LAST_STATIC.clear()
    overrides = [f"run.dir={workdir}", f"data.embedding_store={str(store).lower()}", f"data.novelty.corpora=[{novelty_corpus}]",
                 f"data.decontam.benchmarks=[{','.join(BENCHMARKS)}]", "data.diversity.max_per_leaf=null",
                 *(f"data.{s}.embedding_model={model}" for s in ("dedup", "decontam", "novelty", "diversity"))]
    ctx = StageContext(load_recipe(compose_recipe("tiny", overrides)), ROOT, RunDir(workdir))
    row: dict = {"store": store, "records": len(records)}
    kept = records
    try:
        for stage in ("dedup", "decontam", "novelty", "diversity", "diversity (resume)"):
            if stage == "novelty":
                kept = kept[: 2 * len(kept) // 3]
            before, start = embedded["texts"], time.perf_counter()
            kept, _, _ = apply_stage(ctx, get_stage(stage.split()[0]), kept)
            row[stage] = {"s": round(time.perf_counter() - start, 2), "embedded": embedded["texts"] - before, "in_out": len(kept)}
    finally:
        embeddings._load, embeddings.encode_static = real_load, real_static
    row["total_s"] = round(sum(v["s"] for k, v in row.items() if isinstance(v, dict)), 1)
    row["store_mib"] = round(sum(f.stat().st_size for f in (workdir / "data" / "embeddings").rglob("*.npy")) / 2**20, 1) if store else 0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--model", default="embedded://all-minilm-l6-v2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from bench_dedup_decontam import corpus

    from sandlab.config import DecontamStage
    from sandlab.data_gen.decontam import TestIndex, load_test_items
    from sandlab.embeddings import embed

    records, _, _ = corpus(args.records, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="sandlab-bench-store-"))
    novelty_corpus = tmp / "corpus.jsonl"  # an "existing dataset": the other half of a second synthetic set
    novelty_corpus.write_text("".join(json.dumps(r) + "\n" for r in corpus(args.records, args.seed + 1)[0][: args.records // 2]))
    embed(["warm up"], model=args.model, progress=False)
    # The test sets' and the corpus's embeddings, cached on disk as the stages ask for them (same texts,
    # same order), so neither row pays for them.
    decontam_cfg = DecontamStage(embedding_model=args.model, benchmarks=BENCHMARKS)
    TestIndex(load_test_items(decontam_cfg), decontam_cfg)
    embed([json.loads(x)["problem"] for x in novelty_corpus.read_text().splitlines()], model=args.model, cache=True, progress=False)
    try:
        rows = [run(records, args.model, store, tmp / ("on" if store else "off"), novelty_corpus) for store in (False, True)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"model": args.model, "rows": rows}, indent=1))
    stages = [k for k, v in rows[0].items() if isinstance(v, dict)]
    print(f"\n| store | {' | '.join(stages)} | total s | store MiB |")
    print("|---|" + "---:|" * (len(stages) + 2))
    for row in rows:
        cells = [f"{row[s]['s']} s ({row[s]['embedded']} embedded)" for s in stages]
        print(f"| {'on' if row['store'] else 'off'} | {' | '.join(cells)} | {row['total_s']} | {row['store_mib']} |")


if __name__ == "__main__":
    main()
