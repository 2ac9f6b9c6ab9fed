"""Decontamination: exact, reformatted and wrapped copies of benchmark problems are caught (with the
matched test item as evidence); unrelated competition problems are not. Real embeddings and faiss."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandlab.benchmarks import load_benchmark
from sandlab.config import DecontamStage
from sandlab.data_gen.decontam import decontaminate
from sandlab.inference.base import ChatBackend, Completion

pytestmark = pytest.mark.skipif(not os.environ.get("SANDLAB_BENCHMARK_DIR"), reason="needs ../shared/benchmarks")
ROOT = Path(__file__).resolve().parents[1]

# Competition-style problems that are in none of the benchmarks (nearest test item below 0.65 cosine).
UNRELATED = [
    "Five men and nine women stand equally spaced around a circle in random order. The probability that every man "
    "stands diametrically opposite a woman is m/n, where m and n are relatively prime positive integers. Find m+n.",
    "Find the number of positive integers less than 1000 that are divisible by 7 but not by 11 and whose digits sum to 10.",
    "A frog starts at 0 on the number line and jumps +1 or +2 with equal probability. What is the probability it ever "
    "lands on 10? Express it as m/n and find m+n.",
    "Find the smallest positive integer n such that n^2 + n + 41 is not prime.",
]
# A loose paraphrase of AIME 2024 problem aime24-84 (cosine ~0.76: below the embedding threshold).
PARAPHRASE = ("Let x, y and z be positive real numbers satisfying log_2(x/(yz)) = 1/2. Find the value of "
              "|log_2(x^4 y^3 z^2)| written as m/n and report m+n.")


def reformat(problem: str) -> str:
    """Whitespace, case and LaTeX formatting changes that leave the problem the same."""
    text = problem.replace("\\frac", "\\dfrac").replace("$", "").replace("\\left", "").replace("\\right", "")
    return "   ".join(text.upper().split())


@pytest.fixture(scope="module")
def copies():
    a24, a25, m500, gpqa = (load_benchmark(n) for n in ("aime24", "aime25", "math500", "gpqa_diamond"))
    records = [
        {"id": "exact-aime24", "problem": a24[3]["problem"], "expect": ("aime24", a24[3]["id"])},
        {"id": "exact-gpqa", "problem": gpqa[5]["problem"], "expect": ("gpqa_diamond", gpqa[5]["id"])},
        {"id": "reformatted-math500", "problem": reformat(m500[42]["problem"]), "expect": ("math500", m500[42]["id"])},
        {"id": "reformatted-aime25", "problem": reformat(a25[7]["problem"]), "expect": ("aime25", a25[7]["id"])},
        {"id": "wrapped-math500", "problem": "Here is a challenging problem.\n\n" + m500[100]["problem"] + "\n\nShow all your work and box the answer.",
         "expect": ("math500", m500[100]["id"])},
        {"id": "wrapped-aime25", "problem": "Solve: " + a25[12]["problem"] + " (Give the answer as an integer between 0 and 999.)",
         "expect": ("aime25", a25[12]["id"])},
    ]
    records += [{"id": f"unrelated-{i}", "problem": p} for i, p in enumerate(UNRELATED)]
    return records


@pytest.mark.slow
def test_copies_caught_with_evidence_and_unrelated_kept(copies):
    kept, dropped, report = decontaminate([{k: v for k, v in r.items() if k != "expect"} for r in copies], DecontamStage())
    assert sorted(r["id"] for r in kept) == sorted(f"unrelated-{i}" for i in range(len(UNRELATED)))
    found = {d["id"]: d["contamination"] for d in dropped}
    for rec in copies:
        if "expect" in rec:
            ev = found[rec["id"]]
            assert (ev["benchmark"], ev["test_id"]) == rec["expect"]
            expected_layer = {"exact": "exact", "reformatted": "exact", "wrapped": "ngram"}[rec["id"].split("-")[0]]
            assert ev["layer"] == expected_layer
    assert report["contaminated"] == 6 and report["per_benchmark"]["math500"]["matches"] == 2
    assert set(report["per_benchmark"]["aime25"]["matched_test_ids"]) == {rec["expect"][1] for rec in copies if rec.get("expect", ("",))[0] == "aime25"}


class YesJudge(ChatBackend):
    """Stands in for the teacher LLM as judge: records what it is asked and answers yes."""

    def __init__(self):
        self.asked = []

    def _generate(self, conversations, sampling, *, desc, seeds):
        self.asked += conversations
        return [[Completion("Yes.")] for _ in conversations]


@pytest.mark.slow
def test_llm_judge_sees_only_candidates_in_the_band():
    judge = YesJudge()
    records = [{"id": "para", "problem": PARAPHRASE}] + [{"id": f"u{i}", "problem": p} for i, p in enumerate(UNRELATED)]
    kept, dropped, _ = decontaminate(records, DecontamStage(), judge=None)
    assert not dropped  # without a judge, a loose paraphrase passes the automatic layers
    kept, dropped, report = decontaminate(records, DecontamStage(llm_judge=True), judge=judge)
    assert [d["id"] for d in dropped] == ["para"]
    assert dropped[0]["contamination"]["layer"] == "llm_judge" and dropped[0]["contamination"]["test_id"] == "aime24-84"
    assert judge.asked and all(PARAPHRASE in conv[0]["content"] for conv in judge.asked)


def test_user_supplied_set(tmp_path):
    extra = tmp_path / "heldout.jsonl"
    extra.write_text(json.dumps({"id": "h1", "problem": UNRELATED[3]}) + "\n")
    kept, dropped, report = decontaminate([{"id": "x", "problem": UNRELATED[3]}], DecontamStage(benchmarks=[], extra_sets=[str(extra)]))
    assert not kept and dropped[0]["contamination"] == {"benchmark": "heldout", "test_id": "h1", "layer": "exact", "score": 1.0}


def run_stage(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "data_gen/run.py", "--config-name", "tiny", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.slow
def test_standalone_stage_on_a_users_file(tmp_path, copies):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"id": r["id"], "problem": r["problem"]}) + "\n" for r in copies))
    out = tmp_path / "out"
    result = run_stage("stage=decontam", f"input={data}", f"output={out}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    assert len(kept) == len(UNRELATED) and len(dropped) == 6 and all(d["reason"] == "contaminated" for d in dropped)
    assert json.loads((out / "summary.json").read_text())["reasons"] == {"contaminated": 6}
    assert json.loads((out / "decontamination_report.json").read_text())["contaminated"] == 6

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "no id"}) + "\n")
    result = run_stage("stage=dedup", f"input={bad}", f"output={tmp_path / 'o2'}", f"run.dir={tmp_path / 'run2'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: stage dedup: record 1 (id=None) lacks ['id']; every record needs a stable id and a problem"


@pytest.mark.slow
def test_decontamination_report_for_a_public_dataset_format(tmp_path):
    """An ingested dataset in its own schema (OpenR1-Math rows): each benchmark match is listed with its test item."""
    m500 = load_benchmark("math500")
    rows = [{"problem": m500[7]["problem"], "solution": "s", "answer": m500[7]["answer"], "uuid": "leaked", "source": "olympiads",
             "generations": ["<think>\nwork\n</think>\n\n\\boxed{x}"], "correctness_math_verify": [True]},
            {"problem": UNRELATED[0], "solution": "s", "answer": "1", "uuid": "fresh", "source": "olympiads",
             "generations": ["<think>\nwork\n</think>\n\n\\boxed{1}"], "correctness_math_verify": [True]}]
    data = tmp_path / "openr1.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = run_stage("stage=decontam", f"input={data}", "data.format=openr1_math", f"output={out}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    report = json.loads((out / "decontamination_report.json").read_text())
    assert [d["id"].split("-g")[0] for d in dropped] == ["leaked"] and report["contaminated"] == 1
    assert m500[7]["id"] in json.dumps(report)  # the matched test item is named


def test_all_records_ngram_overlap_equals_the_one_text_rule(tmp_path):
    """ngram_matches (all records at once, hashed n-grams) names the same item with the same score as
    ngram_match (one text, word tuples) on records built from pieces of the test items: wrapped copies,
    halves, mixtures of two items, short items inside text, and unrelated text."""
    import random

    from sandlab.data_gen.decontam import TestIndex, load_test_items
    from sandlab.text import normalize_text

    items = [{"id": f"t{i}", "problem": p} for i, p in enumerate([
        "Find the number of positive integers n less than 1000 such that n squared ends in the digits 21.",
        "Let triangle ABC have sides 13 14 and 15 and let I be its incenter; find the inradius of the triangle.",
        "How many ways can 8 rooks be placed on a chessboard so that none attack each other and none is on the main diagonal?",
        "Compute the sum of all real roots of x^4 - 5x^2 + 4.",
        "What is the remainder of 2^100 mod 7?",
        "Evaluate the integral of x squared.",  # 6 words, under ngram_n: found by substring search
    ])]
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    cfg = DecontamStage(benchmarks=[], extra_sets=[str(path)], ngram_n=8, ngram_overlap=0.4, embedding_model="embedded://minilm-l6-static")
    index = TestIndex(load_test_items(cfg), cfg)
    rng = random.Random(0)
    words = [it["problem"].split() for it in items]
    texts = []
    for _ in range(300):
        a, b = rng.sample(range(len(items)), 2)
        cut = rng.randint(2, len(words[a]))
        texts.append(rng.choice([
            " ".join(words[a][:cut]) + " and also " + " ".join(words[b][cut // 2:]),
            "Please solve: " + items[a]["problem"],
            " ".join(rng.sample(words[a] + words[b], k=10)),
            "An unrelated question about apples and pears in a basket.",
        ]))
    got_item, got_share = index.ngram_matches([normalize_text(t) for t in texts])
    expected = [index.ngram_match(t) for t in texts]
    assert [(int(i), float(s)) if i >= 0 else None for i, s in zip(got_item, got_share)] == expected
    assert 30 < sum(m is not None for m in expected) < 290 and index.short
    assert any(m is not None and m[0] == 5 for m in expected)  # the short item, inside other text
