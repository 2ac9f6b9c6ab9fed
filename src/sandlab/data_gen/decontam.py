"""Decontamination against the test benchmarks (and user-supplied sets), in layers:

1. normalized exact match (whitespace, case, LaTeX formatting ignored),
2. word n-gram overlap: the share of a test item's n-grams found in the record (catches a test
   problem wrapped in extra text), through an inverted index, so cost grows with the records' length,
3. embedding top-k retrieval (faiss) above a cosine threshold (catches close paraphrases),
4. optionally an LLM judge ("same problem or a paraphrase?") on the candidates just below it.

Every dropped record names the matched test item (benchmark, id, layer, score) as evidence.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sandlab.benchmarks import load_benchmark
from sandlab.config import DecontamStage, SamplingSettings
from sandlab.embeddings import embed
from sandlab.errors import ConfigError
from sandlab.inference.base import ChatBackend
from sandlab.records import Record, read_jsonl, write_json
from sandlab.stages import Kind, Stage, StageContext
from sandlab.text import ngram_hashes, normalize_text, word_hashes, word_ngrams

MIN_SHORT_WORDS = 4
JUDGE_PROMPT = """Do these two texts pose the same problem (identical, reformatted, or paraphrased, possibly with \
different wording but the same question and answer)? Reply with one word: yes or no.

Text A:
{a}

Text B:
{b}"""


def load_test_items(cfg: DecontamStage) -> list[dict[str, Any]]:
    """Benchmark items plus user sets, as ``{set, id, problem}``."""
    items = []
    for name in cfg.benchmarks:
        items += [{"set": name, "id": it["id"], "problem": it["problem"]} for it in load_benchmark(name)]
    for path in cfg.extra_sets:
        if not Path(path).is_file():
            raise ConfigError(f"data.decontam.extra_sets: {path} does not exist")
        for i, row in enumerate(read_jsonl(path)):
            if "problem" not in row:
                raise ConfigError(f"data.decontam.extra_sets: {path} line {i + 1} has no 'problem' field")
            items.append({"set": Path(path).stem, "id": str(row.get("id", i)), "problem": row["problem"]})
    return items


class TestIndex:
    """Exact keys, an n-gram inverted index and an embedding index over the test items."""

    def __init__(self, items: list[dict[str, Any]], cfg: DecontamStage):
        import faiss  # noqa: PLC0415

        self.items, self.cfg = items, cfg
        normalized_items = [normalize_text(it["problem"]) for it in items]
        self.exact = {text: i for i, text in enumerate(normalized_items)}
        self.ngram_counts = []
        self.postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
        # Test items shorter than n words have no n-gram to find inside a longer record: a wrapped copy
        # of one is found by substring search instead (items under MIN_SHORT_WORDS only by exact match,
        # since a two-word "problem" inside a record proves nothing).
        self.short: list[tuple[str, int]] = []
        for i, normalized in enumerate(normalized_items):
            n_words = len(normalized.split())
            if n_words < cfg.ngram_n:
                if n_words >= MIN_SHORT_WORDS:
                    self.short.append((f" {normalized} ", i))
                self.ngram_counts.append(0)
                continue
            grams = word_ngrams(normalized, cfg.ngram_n)
            self.ngram_counts.append(len(grams))
            for gram in grams:
                self.postings[gram].append(i)
        vectors = embed([it["problem"] for it in items], model=cfg.embedding_model, batch_size=cfg.batch_size, device=cfg.embedding_device, cache=True)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

        # Every item's distinct n-grams as (64-bit hash, item), sorted by hash: the overlap of all records
        # with all items is then a few array operations (``ngram_matches``). Two different n-grams
        # sharing a hash is a 2^-64 event; ``ngram_match`` is the same rule, one text at a time.
        hashes, lengths, starts = word_hashes([text if self.ngram_counts[i] else "" for i, text in enumerate(normalized_items)])
        grams, owner = ngram_hashes(hashes, lengths, starts, cfg.ngram_n)
        pairs = np.unique(np.stack([grams, owner.astype(np.uint64)], axis=1), axis=0)
        self.gram_hash, self.gram_item = pairs[:, 0].copy(), pairs[:, 1].astype(np.int64)
        self.gram_total = np.maximum(np.asarray(self.ngram_counts, dtype=np.float64), 1.0)

    def ngram_matches(self, normalized: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """For each (normalized) record, the test item ``ngram_match`` would name and its score (-1, 0.0
        for none): a short item found inside it (score 1.0), else the item with the largest share of
        its n-grams in the record (ties: the later item), if that share reaches ``ngram_overlap``."""
        n, n_items = len(normalized), max(len(self.items), 1)
        best_item, best_share = np.full(n, -1, dtype=np.int64), np.zeros(n)
        grams, owner = ngram_hashes(*word_hashes(normalized), self.cfg.ngram_n)
        lo = np.searchsorted(self.gram_hash, grams, "left")
        hi = np.searchsorted(self.gram_hash, grams, "right")
        hit = hi > lo
        grams, owner, lo, hi = grams[hit], owner[hit], lo[hit], hi[hit]
        if grams.size:
            order = np.lexsort((grams, owner))  # a record's n-grams count once (word_ngrams is a set)
            grams, owner, lo, hi = grams[order], owner[order], lo[order], hi[order]
            first = np.ones(len(grams), dtype=bool)
            first[1:] = (owner[1:] != owner[:-1]) | (grams[1:] != grams[:-1])
            owner, lo, hi = owner[first], lo[first], hi[first]
            counts = hi - lo  # items holding this n-gram
            before = np.cumsum(counts) - counts
            positions = np.repeat(lo - before, counts) + np.arange(int(counts.sum()))
            keys, hits = np.unique(np.repeat(owner, counts) * n_items + self.gram_item[positions], return_counts=True)
            rec, item = keys // n_items, keys % n_items
            share = hits / self.gram_total[item]
            order = np.lexsort((item, share, rec))  # per record: largest share last, ties by item
            last = np.ones(len(order), dtype=bool)
            last[:-1] = rec[order][1:] != rec[order][:-1]
            chosen = order[last]
            passed = chosen[share[chosen] >= self.cfg.ngram_overlap]
            best_item[rec[passed]], best_share[rec[passed]] = item[passed], share[passed]
        if self.short:  # a handful of needles: substring search, which wins over n-grams as in ngram_match
            for r, text in enumerate(normalized):
                padded = f" {text} "
                for needle, i in self.short:
                    if needle in padded:
                        best_item[r], best_share[r] = i, 1.0
                        break
        return best_item, best_share

    def ngram_match(self, text: str) -> tuple[int, float] | None:
        normalized = normalize_text(text)
        if self.short:
            padded = f" {normalized} "
            for needle, i in self.short:
                if needle in padded:
                    return i, 1.0
        hits: Counter[int] = Counter()
        for gram in word_ngrams(normalized, self.cfg.ngram_n):
            for i in self.postings.get(gram, ()):
                hits[i] += 1
        best = max(((hits[i] / self.ngram_counts[i], i) for i in hits), default=None)
        return (best[1], best[0]) if best and best[0] >= self.cfg.ngram_overlap else None


def _evidence(item: dict[str, Any], layer: str, score: float) -> dict[str, Any]:
    # Only ids, never test-item text: GPQA asks that its questions stay out of logs and datasets.
    return {"benchmark": item["set"], "test_id": item["id"], "layer": layer, "score": round(float(score), 4)}


def _judge(backend: ChatBackend, pairs: list[tuple[str, str]]) -> list[bool]:
    prompts = [[{"role": "user", "content": JUDGE_PROMPT.format(a=a, b=b)}] for a, b in pairs]
    outputs = backend.generate(prompts, SamplingSettings(n=1, temperature=0.0, max_tokens=8), desc="decontam judge")
    return [bool(out) and out[0].ok and out[0].text.strip().lower().startswith("yes") for out in outputs]


def decontaminate(
    records: list[Record], cfg: DecontamStage, *, judge: ChatBackend | None = None, field: str = "problem", vectors: np.ndarray | None = None,
    store: Path | None = None,
) -> tuple[list[Record], list[Record], dict[str, Any]]:
    """Split records into (clean, contaminated-with-evidence) and a per-benchmark report.

    ``vectors``: precomputed normalized embeddings of the records (same model as the test index);
    ``store``: an EmbeddingStore directory to take them from and add them to.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    items = load_test_items(cfg)
    if not items:
        return list(records), [], {"test_items": 0, "per_benchmark": {}}
    index = TestIndex(items, cfg)
    verdicts: dict[int, dict[str, Any]] = {}
    unresolved = []
    normalized = [normalize_text(rec[field]) for rec in tqdm(records, desc="decontam (exact, n-gram)", unit="record", dynamic_ncols=True)]
    ngram_item, ngram_share = index.ngram_matches(normalized)
    for r in range(len(records)):
        hit = index.exact.get(normalized[r])
        if hit is not None:
            verdicts[r] = _evidence(items[hit], "exact", 1.0)
        elif ngram_item[r] >= 0:
            verdicts[r] = _evidence(items[ngram_item[r]], "ngram", ngram_share[r])
        else:
            unresolved.append(r)
    candidates: list[tuple[int, int, float]] = []
    if unresolved:
        if vectors is None:
            queries = embed([records[r][field] for r in unresolved], model=cfg.embedding_model, batch_size=cfg.batch_size, device=cfg.embedding_device,
                            store=store)
        else:
            queries = vectors[unresolved]
        scores, ids = index.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(cfg.embedding_top_k, len(items)))
        for r, row_scores, row_ids in zip(unresolved, scores, ids):
            score, best = float(row_scores[0]), int(row_ids[0])
            if score >= cfg.embedding_threshold:
                verdicts[r] = _evidence(items[best], "embedding", score)
            elif judge is not None and score >= cfg.judge_threshold:
                candidates += [(r, int(i), float(s)) for i, s in zip(row_ids, row_scores) if s >= cfg.judge_threshold]
    if candidates:
        same = _judge(judge, [(records[r][field], items[i]["problem"]) for r, i, _ in candidates])
        for (r, i, score), yes in zip(candidates, same):
            if yes and r not in verdicts:
                verdicts[r] = _evidence(items[i], "llm_judge", score)
    kept = [rec for r, rec in enumerate(records) if r not in verdicts]
    dropped = [{**records[r], "reason": "contaminated", "contamination": verdicts[r]} for r in sorted(verdicts)]
    per_benchmark: dict[str, Any] = {}
    for ev in (d["contamination"] for d in dropped):
        entry = per_benchmark.setdefault(ev["benchmark"], {"matches": 0, "by_layer": Counter(), "matched_test_ids": []})
        entry["matches"] += 1
        entry["by_layer"][ev["layer"]] += 1
        entry["matched_test_ids"].append(ev["test_id"])
    report = {
        "test_items": len(items),
        "records": len(records),
        "contaminated": len(dropped),
        "judged_candidates": len(candidates),
        "per_benchmark": {k: {**v, "by_layer": dict(v["by_layer"])} for k, v in sorted(per_benchmark.items())},
        "settings": {"ngram_n": cfg.ngram_n, "ngram_overlap": cfg.ngram_overlap, "embedding_threshold": cfg.embedding_threshold, "llm_judge": cfg.llm_judge},
    }
    return kept, dropped, report


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    judge = ctx.teacher if ctx.cfg.data.decontam.llm_judge else None
    kept, dropped, report = decontaminate(records, ctx.cfg.data.decontam, judge=judge, store=ctx.embedding_store)
    write_json(ctx.data_dir / "decontamination_report.json", report)
    return kept, dropped


def preflight(ctx: StageContext) -> None:
    for name in ctx.cfg.data.decontam.benchmarks:
        load_benchmark(name, limit=1)


STAGE = Stage(
    "decontam", Kind.DATA, run, preflight=preflight, config=("data.decontam",), needs_teacher=lambda cfg: cfg.data.decontam.llm_judge,
    input_fields=("id", "problem"), input_hint="every record needs a stable id and a problem",
    hint="check data.decontam thresholds; everything matched a test benchmark",
)
