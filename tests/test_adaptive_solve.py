"""Adaptive solve (data.solve.adaptive): solutions in rounds, no more for a problem the agreement filter
can no longer keep; the kept problems and their solutions are those of one round of k."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import pytest
from chat_stub import ChatStub, prompt_of

from sandlab.config import AgreementStage, SamplingSettings, SolveStage
from sandlab.data_gen.agreement import cannot_be_kept, filter_by_agreement, filter_by_reference
from sandlab.data_gen.solve import round_sizes, solve_problems
from sandlab.errors import BackendUnavailableError, ConfigError
from sandlab.grading import GradingPool
from sandlab.inference.base import ChatBackend, Completion
from sandlab.inference.openai_client import OpenAICompatibleBackend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool():
    with GradingPool(num_workers=1, timeout_s=5.0) as p:
        yield p


@pytest.mark.parametrize(("k", "sizes", "expected"), [
    (4, None, [1, 1, 2]), (8, None, [1, 1, 2, 4]), (3, None, [1, 1, 1]), (5, None, [1, 1, 2, 1]), (1, None, [1]),
    (5, [2], [2, 3]), (4, [3, 3], [3, 1]), (4, [1, 1, 1, 1, 1], [1, 1, 1, 1]),
])
def test_round_sizes(k, sizes, expected):
    assert round_sizes(SolveStage(k=k, round_sizes=sizes)) == expected


@pytest.mark.parametrize("bad", [{"k": 0}, {"round_sizes": [1, 0]}, {"round_sizes": []}])
def test_bad_solve_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="data.solve"):
        SolveStage(**bad)


def _record(i: int, answers: list[str | None], reference: str | None) -> dict:
    return {"id": f"r{i}", "problem": f"p{i}", "reference_answer": reference,
            "solutions": [{"text": f"\\boxed{{{a}}}" if a else "no idea", "answer": a, "finish_reason": "stop"} for a in answers]}


# "1" and "1.0" are equal to math-verify, not as strings; None is a solution without an answer.
ALPHABET = ["1", "1.0", "2", "3", None]


@pytest.mark.parametrize(("min_agreement", "min_votes", "include_reference"), [(1.0, 2, True), (0.6, 2, False), (0.5, 3, True)])
def test_cannot_be_kept_is_exactly_when_no_remaining_solutions_can_pass(pool, min_agreement, min_votes, include_reference):
    """Against brute force: every way the remaining solutions could come out, through the filter itself."""
    k, rng = 4, random.Random(f"{min_agreement}-{min_votes}")
    cfg = AgreementStage(min_agreement=min_agreement, min_votes=min_votes, require_numeric=False)
    partials = [_record(i, [rng.choice(ALPHABET) for _ in range(rng.randint(1, k - 1))], rng.choice(["1", "2", None])) for i in range(20)]
    verdicts = cannot_be_kept(partials, k, cfg, pool, include_reference=include_reference)
    full, owner = [], []
    for r, rec in enumerate(partials):
        for rest in itertools.product(ALPHABET, repeat=k - len(rec["solutions"])):
            full.append(_record(len(full), [s["answer"] for s in rec["solutions"]] + list(rest), rec["reference_answer"]))
            owner.append(r)
    kept, _ = filter_by_agreement(full, cfg, pool, include_reference=include_reference)
    keepable = {owner[int(rec["id"][1:])] for rec in kept}
    assert verdicts == [r not in keepable for r in range(len(partials))]
    assert any(verdicts) and not all(verdicts)  # the sample exercises both outcomes


def test_reference_mode_stops_when_too_few_solutions_are_left_to_match(pool):
    cfg = AgreementStage(mode="reference", min_votes=2)
    records = [_record(0, ["2", "2"], "1"), _record(1, ["1", "2"], "1"), _record(2, ["2"], "1"), _record(3, ["2", "2"], None)]
    # k=3: no match in two with one to go (stop); one match with one to go; one to match of two left; no reference: the score stage decides.
    assert cannot_be_kept(records, 3, cfg, pool, include_reference=False) == [True, False, False, False]
    assert cannot_be_kept(records, 3, AgreementStage(mode="reference", min_votes=2, llm_judge=True), pool, include_reference=False) == [False] * 4


# --- a simulated teacher: its answer is a function of (problem, seed) ------------------------------------------------
def _draw(problem: str, seed: int | None) -> float:
    return int(hashlib.sha256(f"{problem}|{seed}".encode()).hexdigest()[:8], 16) / 16**8


def _answer_for(problem: str, seed: int | None) -> str:
    """Problem "Problem 7 (agreement 0.6)": answer 7 with probability 0.6 per seed, else 8 or 9."""
    number, rate = problem.split()[1], float(problem.split("agreement ")[1].rstrip(")"))
    u = _draw(problem, seed)
    return number if u < rate else str(int(number) + 1 + int(u * 100) % 2)


class SimulatedTeacher(ChatBackend):
    name = "simulated"

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[int | None]] = []
        self.fail_on_call = fail_on_call

    def _generate(self, conversations, sampling, *, desc, seeds):
        self.calls.append(list(seeds))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise BackendUnavailableError("the teacher went away")
        rows = []
        for conv, seed in zip(conversations, seeds):
            problem = prompt_of({"messages": conv})[1]["problem"]
            rows.append([Completion(f"Work.\nFinal answer: \\boxed{{{_answer_for(problem, seed)}}}", completion_tokens=100)])
        return rows


def _problems(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rate = rng.choice([0.35, 0.7, 0.95, 1.0])
        out.append({"id": f"q{i}", "problem": f"Problem {i + 10} (agreement {rate})", "reference_answer": str(i + 10)})
    return out


SOLVE = SolveStage(k=4, sampling=SamplingSettings(temperature=1.0, max_tokens=64, seed=1000))
UNANIMITY = AgreementStage(min_agreement=1.0, min_votes=2)


def _kept(records, pool):
    return filter_by_agreement(records, UNANIMITY, pool, include_reference=True)[0]


def test_adaptive_keeps_exactly_the_fixed_k_problems_with_fewer_solutions(pool):
    problems = _problems(40)
    fixed_teacher, adaptive_teacher = SimulatedTeacher(), SimulatedTeacher()
    fixed = solve_problems(fixed_teacher, problems, SOLVE, ROOT, seed_offset=5)
    adaptive = solve_problems(adaptive_teacher, problems, SOLVE, ROOT, seed_offset=5, agreement=UNANIMITY, pool=pool)
    assert _kept(adaptive, pool) == _kept(fixed, pool) and 0 < len(_kept(fixed, pool)) < len(problems)
    for f, a in zip(fixed, adaptive):  # every adaptive solution is the fixed run's solution of that index
        assert a["solutions"] == f["solutions"][: len(a["solutions"])]
        assert len(a["solutions"]) + a.get("solutions_skipped", 0) == 4
    # Seeds: solution j of the problem at position p (in the whole input) has seed 1000 + 4p + j.
    assert fixed_teacher.calls == [[1000 + 4 * (5 + p) + j for p in range(40) for j in range(4)]]
    assert [len(c) for c in adaptive_teacher.calls][0] == 40 and len(adaptive_teacher.calls) == 3
    assert sum(map(len, adaptive_teacher.calls)) < 0.8 * 160


def test_resume_after_a_failed_round_samples_only_what_is_missing(pool, tmp_path):
    problems, rounds_file = _problems(12, seed=1), tmp_path / "rounds" / "0000000000.json"
    whole = solve_problems(SimulatedTeacher(), problems, SOLVE, ROOT, agreement=UNANIMITY, pool=pool)
    with pytest.raises(BackendUnavailableError):
        solve_problems(SimulatedTeacher(fail_on_call=2), problems, SOLVE, ROOT, agreement=UNANIMITY, pool=pool, rounds_file=rounds_file)
    assert json.loads(rounds_file.read_text())["rounds_done"] == 1
    again = SimulatedTeacher()
    resumed = solve_problems(again, problems, SOLVE, ROOT, agreement=UNANIMITY, pool=pool, rounds_file=rounds_file)
    assert resumed == whole
    assert all(j % 4 >= 1 for call in again.calls for j in ((s - 1000) for s in call))  # no first solution drawn twice
    # A rounds file of another input is not used.
    other = _problems(12, seed=2)
    assert solve_problems(SimulatedTeacher(), other, SOLVE, ROOT, agreement=UNANIMITY, pool=pool, rounds_file=rounds_file) == \
        solve_problems(SimulatedTeacher(), other, SOLVE, ROOT, agreement=UNANIMITY, pool=pool)


def test_partitions_sample_what_the_whole_input_does(pool):
    problems = _problems(10, seed=3)
    whole = solve_problems(SimulatedTeacher(), problems, SOLVE, ROOT, agreement=UNANIMITY, pool=pool)
    halves = [solve_problems(SimulatedTeacher(), problems[lo:hi], SOLVE, ROOT, seed_offset=lo, agreement=UNANIMITY, pool=pool)
              for lo, hi in ((0, 4), (4, 10))]
    assert halves[0] + halves[1] == whole


def test_reference_mode_adaptive_equals_fixed(pool):
    cfg = AgreementStage(mode="reference", min_votes=3)
    problems = _problems(20, seed=4)
    fixed = solve_problems(SimulatedTeacher(), problems, SOLVE, ROOT)
    teacher = SimulatedTeacher()
    adaptive = solve_problems(teacher, problems, SOLVE, ROOT, agreement=cfg, pool=pool)
    assert filter_by_reference(adaptive, cfg, pool)[0] == filter_by_reference(fixed, cfg, pool)[0]
    assert sum(map(len, teacher.calls)) < 80


# --- the same through the OpenAI client and a real HTTP server ------------------------------------------------------
def test_scripted_server_adaptive_keeps_the_fixed_k_ids_with_fewer_requests(pool):
    asked: list[tuple[str, int, int]] = []

    def teacher(body):
        _name, fields = prompt_of(body)
        asked.append((fields["problem"], body["seed"], body["n"]))
        return [f"So the answer is \\boxed{{{_answer_for(fields['problem'], body['seed'])}}}."]

    problems = _problems(16, seed=5)
    with ChatStub(teacher) as stub:
        backend = OpenAICompatibleBackend("teacher", [stub.url], max_retries=1, retry_backoff_s=0.01, timeout_s=10)
        fixed = solve_problems(backend, problems, SOLVE, ROOT)
        n_fixed = len(asked)
        adaptive = solve_problems(backend, problems, SOLVE, ROOT, agreement=UNANIMITY, pool=pool)
    fixed_ids, adaptive_ids = [r["id"] for r in _kept(fixed, pool)], [r["id"] for r in _kept(adaptive, pool)]
    assert adaptive_ids == fixed_ids and fixed_ids
    assert n_fixed == 64 and len(asked) - n_fixed < 64 and all(n == 1 for _, _, n in asked)
    assert set(asked[n_fixed:]) <= set(asked[:n_fixed])  # adaptive requests are fixed-k requests, seeds included


def test_benchmark_script_runs_and_checks_identical_kept_sets():
    """data_gen/bench_adaptive_solve.py (docs/PERFORMANCE.md), small: it exits non-zero unless fixed and
    adaptive keep the same ids, and the adaptive run draws fewer solutions."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "data_gen/bench_adaptive_solve.py"), "--problems", "120", "--yields", "0.42",
                          "--concentrations", "1", "--round-sizes", "doubling", "--markdown"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    row = [line for line in out.stdout.splitlines() if line.startswith("| 1,1,2 |")]
    assert len(row) == 1 and row[0].endswith("| identical |")
    drawn = row[0].split("|")[4].split("->")
    assert int(drawn[0].replace(",", "")) == 480 > int(drawn[1].replace(",", ""))
