"""Science multiple-choice and LuminaSFT-style general generation, and the agreement stage's LLM judge.

Parsing and taxonomy draws are checked directly; the stages run through `data_gen/run.py` with the
real OpenAI client against a scripted teacher server (a teacher able to write PhD-level questions does
not fit on a CPU runner), the real grader and real embeddings.
"""

import collections
import json
import random
import re
from pathlib import Path

import pytest
import yaml
from chat_stub import ChatStub, prompt_of
from test_pipeline import run_sandlab

from sandlab.config import GenerationStage
from sandlab.data_gen.agreement import is_textual_answer
from sandlab.data_gen.generate import build_requests, parse_problem
from sandlab.data_gen.taxonomy import Taxonomy
from sandlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MCQ = "<Q>Which gas is most abundant in air?</Q><CORRECT>Nitrogen</CORRECT><WRONG>Oxygen</WRONG><WRONG>Argon</WRONG><WRONG>Carbon dioxide</WRONG><S>Air is 78% N2.</S>"


def options_of(problem: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-D])\) (.*)$", problem, re.M))


def test_mcq_correct_option_lands_on_a_uniform_random_letter():
    letters = collections.Counter()
    for i in range(800):
        fields, reason = parse_problem(MCQ, style="mcq", record_id=f"science-{i}")
        assert reason is None
        options = options_of(fields["problem"])
        assert sorted(options.values()) == ["Argon", "Carbon dioxide", "Nitrogen", "Oxygen"]
        assert options[fields["reference_answer"]] == "Nitrogen"
        assert fields["reference_solution"].endswith(f"\\boxed{{{fields['reference_answer']}}}.")
        letters[fields["reference_answer"]] += 1
    assert set(letters) == set("ABCD") and all(150 <= c <= 250 for c in letters.values()), letters  # 200 expected each
    assert parse_problem(MCQ, style="mcq", record_id="x") == parse_problem(MCQ, style="mcq", record_id="x")  # stable on rerun


@pytest.mark.parametrize("text, reason", [
    ("<Q>Q?</Q><CORRECT>a</CORRECT><WRONG>b</WRONG><WRONG>c</WRONG>", "missing_options"),
    ("<Q>Q?</Q><CORRECT>a</CORRECT><CORRECT>b</CORRECT><WRONG>c</WRONG><WRONG>d</WRONG><WRONG>e</WRONG>", "missing_options"),
    ("<Q>Q?</Q><CORRECT>a</CORRECT><WRONG>b</WRONG><WRONG>A </WRONG><WRONG>d</WRONG>", "duplicate_options"),
    ("<CORRECT>a</CORRECT><WRONG>b</WRONG><WRONG>c</WRONG><WRONG>d</WRONG>", "missing_problem_tag"),
])
def test_mcq_drop_reasons(text, reason):
    assert parse_problem(text, style="mcq", record_id="r") == (None, reason)


def test_science_taxonomy_weights_subjects_and_areas():
    tax = Taxonomy.load(ROOT / "data_gen/taxonomies/science.yaml")
    rng = random.Random(0)
    draws = [tax.draw(rng) for _ in range(4000)]
    subjects = collections.Counter(d.primary for d in draws)
    total = sum(tax.weights.values())
    for subject, weight in tax.weights.items():  # physics 4, chemistry 4.5, biology 1.5 of 10
        assert abs(subjects[subject] / len(draws) - weight / total) < 0.03, subjects
    physics = collections.Counter(d.topic for d in draws if d.primary == "physics")
    assert physics["quantum mechanics"] > 2 * physics["relativity"]  # area weights 3 vs 1


def test_general_requests_draw_domain_topic_task(tmp_path):
    cfg = GenerationStage(num_problems=50, style="general", taxonomy="data_gen/taxonomies/general.yaml", prompt="data_gen/prompts/general_task.txt")
    tax = Taxonomy.load(ROOT / cfg.taxonomy)
    for req in build_requests(cfg, ROOT, seed=1):
        assert req["task"] in tax.branches[req["branch"]][req["topic"]][1]
        assert req["answer_kind"] == "open" and f'"{req["task"]}" task' in req["prompt"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("branches: {a: {t: nope}, b: [x]}\n")
    with pytest.raises(ConfigError, match="positive weight or a list of tasks"):
        Taxonomy.load(bad)


def science_teacher(body: dict) -> list[str]:
    """Writes "what is a+b" questions (the correct sum first, as teachers tend to) and solves them by
    reading the options; questions whose sum is odd get a split vote."""
    prompt, seed, n = body["messages"][0]["content"], body.get("seed") or 0, body.get("n", 1)
    template, fields = prompt_of(body)
    if template == "science_mcq":
        a, b = seed % 17 + 2, seed % 5 + 3
        wrong = "".join(f"<WRONG>{a + b + d} moles</WRONG>" for d in (1, 2, 3))
        return [f"<think>plan</think><Q>How many moles are in {a} plus {b} moles?</Q><CORRECT>{a + b} moles</CORRECT>{wrong}<S>Add them.</S>"]
    a, b = map(int, re.findall(r"in (\d+) plus (\d+) moles", prompt)[0])
    options = {v: k for k, v in options_of(fields["problem"]).items()}
    right, other = options[f"{a + b} moles"], options[f"{a + b + 1} moles"]
    out = []
    for s in range(seed, seed + n):  # each solution has its own seed: odd ones pick the other option on odd sums
        p = other if (a + b) % 2 and s % 2 else right
        out.append(f"Adding gives {a + b}. The answer is ({p})." if s % 2 else f"Sum {a + b}, so \\boxed{{{p}}}")
    return out


@pytest.mark.slow
def test_science_mcq_pipeline_end_to_end(tmp_path):
    stub = ChatStub(science_teacher)
    run_dir = tmp_path / "run"
    try:
        result = run_sandlab("teacher=openai_servers", f"teacher.base_urls=[{stub.url}]", "teacher.model=stub", "data=sand_science",
                             "data.generate.num_problems=12", "data.solve.k=2", "data.export.min_words=0",
                             "stages=[generate,solve,filter,dedup,export]", f"run.dir={run_dir}", entry=("data_gen/run.py",))
    finally:
        stub.close()
    assert result.returncode == 0, result.stderr[-2000:]
    sft = [json.loads(line) for line in (run_dir / "sft/train.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (run_dir / "data/filter.dropped.jsonl").read_text().splitlines()]
    assert sft and dropped and {d["reason"] for d in dropped} == {"disagreement"}
    for row in sft:
        problem = row["prompt"][-1]["content"]
        a, b = map(int, re.findall(r"in (\d+) plus (\d+) moles", problem)[0])
        assert (a + b) % 2 == 0 and options_of(problem)[row["answer"]] == f"{a + b} moles"
        assert row["variant"] == "science" and row["source"]["answer_kind"] == "mcq"
        assert row["source"]["branch"] in ("physics", "chemistry", "biology")
    assert len({row["answer"] for row in sft}) >= 2  # the teacher always wrote the correct option first
    assert (run_dir / "sft/science/train.jsonl").read_text() == (run_dir / "sft/train.jsonl").read_text()
    card = (run_dir / "sft/README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert [c["config_name"] for c in header["configs"]] == ["all", "science"] and "science" in header["tags"]
    filtered = json.loads((run_dir / "stages/filter.done").read_text())
    assert f"| filter | {filtered['in']} | {filtered['out']} | {filtered['dropped']} | disagreement: {filtered['dropped']} |" in card
    assert f"| science | {len(sft)} |" in card and "style: mcq" in card


def general_teacher(body: dict) -> list[str]:
    prompt, seed = body["messages"][0]["content"], body.get("seed") or 0
    template, fields = prompt_of(body)
    if template == "general_task":
        return [f"<Q>Request {seed}: help me with {fields['topic']}.</Q>"]
    number = int(re.search(r"Request (\d+)", prompt).group(1))
    return ["" if number % 3 == 0 else f"<think>consider</think>Sure. Here is help for request {number}."]


@pytest.mark.slow
def test_general_taxonomy_pipeline_end_to_end(tmp_path):
    """lumina_general with the reward-model scorer in the pipeline: best of the complete responses, then the diversity report."""
    stub = ChatStub(general_teacher)
    run_dir = tmp_path / "run"
    try:
        result = run_sandlab("teacher=openai_servers", f"teacher.base_urls=[{stub.url}]", "teacher.model=stub", "data=lumina_general",
                             "data.generate.num_problems=9", "data.solve.k=2", "data.solve.sampling.n=2", "data.score.scorer=reward_model",
                             "data.score.reward_model.model=embedded://tiny-random-reward", "data.score.threshold=null",
                             "stages=[generate,solve,filter,score,diversity,export]", f"run.dir={run_dir}", entry=("data_gen/run.py",))
    finally:
        stub.close()
    assert result.returncode == 0, result.stderr[-2000:]
    sft = [json.loads(line) for line in (run_dir / "sft/train.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (run_dir / "data/filter.dropped.jsonl").read_text().splitlines()]
    assert len(sft) == 6 and [d["reason"] for d in dropped] == ["no_complete_response"] * 3
    for row in sft:
        number = int(re.search(r"Request (\d+)", row["prompt"][-1]["content"]).group(1))
        assert row["completion"][0]["content"].endswith(f"Here is help for request {number}.")  # no \boxed appended
        assert row["answer"] is None and row["source"]["task"] and row["variant"] == "general"
        assert [m["role"] for m in row["prompt"]] == ["user"]  # no system prompt for general chat data
    scored = [json.loads(line) for line in (run_dir / "data/score.jsonl").read_text().splitlines()]
    assert len(scored) == 6 and all(r["scored_by"] == "reward_model:embedded://tiny-random-reward" and r["score"] == max(r["candidate_scores"])
                                    for r in scored)
    diversity = json.loads((run_dir / "data/diversity.json").read_text())
    assert diversity["records"] == 6 and sum(diversity["coverage"]["per_leaf"].values()) == 6


@pytest.mark.parametrize("answer, textual", [("\\text{Alice wins}", True), ("no solution", True), ("\\frac{\\sqrt{3}}{2}", False),
                                             ("(-\\infty, 3]", False), ("x^2 + 1", False), ("\\{1, 2\\}", False)])
def test_textual_answers_are_the_ones_the_grader_cannot_compare(answer, textual):
    assert is_textual_answer(answer) is textual


def judging_teacher(body: dict) -> list[str]:
    prompt = body["messages"][0]["content"]
    template, fields = prompt_of(body)
    if template == "judge_answer":
        return ["<think>reading</think>\\boxed{5}" if "equals five" in prompt else "NONE"]
    if template == "judge_equivalence":
        a, b = fields["a"], fields["b"]
        return ["After thinking: YES" if {"Alice" in a, "Alice" in b} == {True} else "NO"]
    raise AssertionError(prompt[:80])


@pytest.mark.slow
def test_agreement_llm_judge_reads_unparsable_answers_and_compares_textual_ones(tmp_path):
    def sol(text, answer=None):
        return {"text": text, "answer": answer, "finish_reason": "stop"}

    records = [
        {"id": "five", "problem": "2+3?", "reference_answer": "5", "reference_solution": "\\boxed{5}",
         "solutions": [sol("so x equals five"), sol("so x equals five"), {**sol("x equals fi"), "finish_reason": "length"}]},
        {"id": "game", "problem": "Who wins?", "reference_answer": "\\text{Alice}", "reference_solution": "\\boxed{\\text{Alice}}",
         "solutions": [sol("\\boxed{\\text{Alice wins}}", "\\text{Alice wins}"), sol("\\boxed{\\text{Alice, the first player}}", "\\text{Alice, the first player}")]},
        {"id": "split", "problem": "Who loses?", "reference_answer": "\\text{Bob}", "reference_solution": "\\boxed{\\text{Bob}}",
         "solutions": [sol("\\boxed{\\text{Alice}}", "\\text{Alice}"), sol("no idea at all")]},
    ]
    data = tmp_path / "solved.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    def run(judge: bool, stub: ChatStub) -> tuple[list, list]:
        out = tmp_path / f"out-{judge}"
        result = run_sandlab("teacher=openai_servers", f"teacher.base_urls=[{stub.url}]", "teacher.model=stub", "stage=filter", f"input={data}",
                             f"output={out}", f"data.agreement.llm_judge={judge}", "data.agreement.require_numeric=false",
                             "data.agreement.min_votes=2", "data.solve.include_reference=true", f"run.dir={tmp_path / f'run-{judge}'}", entry=("data_gen/run.py",))
        assert result.returncode == 0, result.stderr[-2000:]
        read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
        return read("kept.jsonl"), read("dropped.jsonl")

    stub = ChatStub(judging_teacher)
    try:
        kept, dropped = run(False, stub)
        assert kept == [] and stub.requests == 0
        kept, dropped = run(True, stub)
    finally:
        stub.close()
    assert {k["id"]: (k["answer"], k["votes"]) for k in kept} == {"five": ("5", 3), "game": ("\\text{Alice wins}", 3)}
    five = next(k for k in kept if k["id"] == "five")
    assert [s.get("answer_source") for s in five["solutions"]] == ["judge", "judge", None]  # the truncated one is not judged
    assert [(d["id"], d["reason"]) for d in dropped] == [("split", "disagreement")]
    # Judge calls: 2 + 1 answer reads ("no idea" gets NONE); game: 3 pairs; split: 1 pair (Alice vs Bob).
    assert stub.requests == 7
