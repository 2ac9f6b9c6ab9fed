"""Difficulty rating, student pass-rate and novelty filters, run as standalone stages on a user's JSONL
through the real OpenAI client against a scripted judge/student server (a capable judge does not fit on
a CPU runner), the real grader and real embeddings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_stub import ChatStub, prompt_of

from sandlab.data_gen.difficulty import parse_rating

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"id": "easy", "problem": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "7"},
    {"id": "mid", "problem": "A train goes 30 km, then 45 km. How far does it go in total?", "answer": "75"},
    {"id": "hard", "problem": "Find the number of ordered triples of primes (p, q, r) with p + q + r = 30.", "answer": "6"},
    {"id": "junk", "problem": "Describe a rainbow.", "answer": "0"},
]


@pytest.mark.parametrize("text, rating", [("Rating: 7", 7.0), ("... Rating: 6.3\n", 6.5), ("rating = **4.5**", 4.5),
                                          ("Rating: 11", None), ("no verdict", None), ("Rating: 2\nRating: 3", 3.0)])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def judge_and_student(body: dict) -> list[str]:
    """Rates: apples 2, train 5, primes 8, anything else unparseable. Student: always right on apples,
    right on half the samples for the train, never right on the primes."""
    prompt, n = body["messages"][0]["content"], body.get("n", 1)
    if prompt_of(body)[0] == "difficulty":
        rating = next((v for k, v in (("apples", "2"), ("train", "5"), ("primes", "8")) if k in prompt), None)
        return [f"Looks fine.\nRating: {rating}" if rating else "I cannot tell." for _ in range(n)]
    right = {"apples": ["7"] * n, "train": ["75", "70"] * n, "primes": ["5"] * n}
    answers = next((v for k, v in right.items() if k in prompt), ["?"] * n)[:n]
    return [f"Working... \\boxed{{{a}}}" for a in answers]


@pytest.fixture(scope="module")
def server():
    s = ChatStub(judge_and_student)
    yield s
    s.close()


def run_stage(tmp_path, stage, *overrides, records=RECORDS):
    data = tmp_path / f"{stage}-in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / f"{stage}-out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "data_gen/run.py", "--config-name", "tiny", f"stage={stage}", f"input={data}", f"output={out}",
                             f"run.dir={tmp_path / ('run-' + stage)}", *overrides], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    return read("kept.jsonl"), read("dropped.jsonl")


def test_difficulty_rating_window(tmp_path, server):
    kept, dropped = run_stage(tmp_path, "difficulty", "teacher=openai_servers", f"teacher.base_urls=[{server.url}]", "teacher.model=m",
                              "data.difficulty.min_difficulty=4.5")
    assert {k["id"]: k["difficulty"] for k in kept} == {"mid": 5.0, "hard": 8.0}
    assert kept[0]["difficulty_ratings"] == [5.0, 5.0, 5.0]
    assert {d["id"]: d["reason"] for d in dropped} == {"easy": "difficulty_out_of_range", "junk": "unrated"}


@pytest.mark.slow
def test_pass_rate_window_keeps_what_the_student_sometimes_solves(tmp_path, server):
    student = ["data.passrate.student.backend=openai", f"data.passrate.student.base_urls=[{server.url}]", "data.passrate.student.model=m", "data.passrate.m=4"]
    kept, dropped = run_stage(tmp_path, "passrate", *student)
    assert [(k["id"], k["pass_rate"]) for k in kept] == [("mid", 0.5)]
    assert {d["id"]: d["pass_rate"] for d in dropped} == {"easy": 1.0, "hard": 0.0, "junk": 0.0}
    # SAND's setting: keep what the student fails.
    kept, _ = run_stage(tmp_path, "passrate", *student, "data.passrate.max_pass_rate=0.0", "data.passrate.strict=false")
    assert sorted(k["id"] for k in kept) == ["hard", "junk"]


@pytest.mark.slow
def test_novelty_against_an_existing_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"problem": "Tom has 3 apples and buys 4 more apples. How many apples does he have now?"}) + "\n")
    kept, dropped = run_stage(tmp_path, "novelty", f"data.novelty.corpora=[{corpus}]")
    assert [d["id"] for d in dropped] == ["easy"] and dropped[0]["reason"] == "not_novel" and dropped[0]["similarity"] >= 0.9
    assert [k["id"] for k in kept] == ["mid", "hard", "junk"]


def hiking_teacher(body: dict) -> list[str]:
    """Hikes by appending a twist; solves hiked problem A consistently (answer 12) and B inconsistently."""
    prompt, n, seed = body["messages"][0]["content"], body.get("n", 1), body.get("seed") or 0
    if prompt_of(body)[0] == "hike":
        name = "A" if "apples" in prompt else "B"
        answer = 12 if name == "A" else 13
        return [f"<Q>Hiked problem {name}: using the theorem, find the count.</Q><S>Careful work gives \\boxed{{{answer}}}.</S>"]
    if "Hiked problem A" in prompt:
        return ["It is 12.\nFinal answer: 12"] * n
    return [f"Final answer: {10 + (seed + i) % 4}" for i in range(n)]  # each sample has its own seed


def test_difficulty_hiking_rewrites_moderate_problems_and_refilters(tmp_path):
    stub = ChatStub(hiking_teacher)
    records = [
        {**RECORDS[0], "difficulty": 4.0, "branch": "number theory"},
        {**RECORDS[1], "difficulty": 5.5, "branch": "algebra"},
        {**RECORDS[2], "difficulty": 9.0, "branch": "number theory"},  # already hard: not hiked
        {**RECORDS[3]},  # unrated: not hiked
    ]
    try:
        kept, dropped = run_stage(tmp_path, "hike", "teacher=openai_servers", f"teacher.base_urls=[{stub.url}]", "teacher.model=m",
                                  "data.solve.k=2", "data.solve.include_reference=true", "data.agreement.min_agreement=1.0", records=records)
    finally:
        stub.close()
    assert [k["id"] for k in kept[:4]] == ["easy", "mid", "hard", "junk"]  # originals pass through
    (hiked,) = kept[4:]
    assert hiked["hiked_from"] == "easy" and hiked["variant"] == "hiked" and hiked["answer"] == "12"
    assert hiked["theorem"] and hiked["secondary_branch"] != "number theory"
    assert [(d["hiked_from"], d["reason"]) for d in dropped] == [("mid", "hiked_disagreement")]
