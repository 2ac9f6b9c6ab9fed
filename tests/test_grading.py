"""Tests for the shared grader: extraction, math equivalence, time-limited pool, sand-grade CLI."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sandlab.grading import (
    GradeItem,
    GradeResult,
    GradingPool,
    extract_choice,
    extract_math_answer,
    grade,
    last_boxed,
    math_equal,
    strip_reasoning,
)

SRC = Path(__file__).resolve().parents[1] / "src"
ADVERSARIAL = r"The answer is \boxed{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def pool():
    with GradingPool(num_workers=2, timeout_s=5.0) as p:
        yield p


# -- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a \\boxed{1}</think>final", "final"),
        ("reasoning \\boxed{1}</think> final part", "final part"),  # template opened <think>
        ("<think>a</think> mid <think>b</think> end", "mid  end"),
        ("<think>truncated, never closed \\boxed{3}", ""),
        ("no tags at all", "no tags at all"),
    ],
)
def test_strip_reasoning(text, expected):
    assert strip_reasoning(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\fbox{7}", "7"),
        (r"so $\boxed 5$.", "5"),
        (r"\boxed{2} and a truncated \boxed{3", "2"),
        ("nothing boxed", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"We get \boxed{3} first, but correcting: \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        # A boxed answer inside the reasoning never beats the final answer ...
        (r"<think>maybe \boxed{3}</think>The final answer is $4$.", "4"),
        (r"<think>maybe \boxed{3}</think>So the answer is \boxed{4}", "4"),
        (r"maybe \boxed{3}</think>Final answer: 4", "4"),
        # ... and is never used as a fallback when the final part has no answer.
        (r"<think>maybe \boxed{3}</think>I am not sure.", None),
        (r"<think>maybe \boxed{3} and then it got cut off", None),
        ("<answer>$12$</answer>", "12"),
        ("<answer>1</answer> later <answer>2</answer>", "2"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
        ("Some work.\nfinal answer: 10.", "10"),
        ("**Final Answer:** $7$", "7"),
        ("The final answer is 10.\nActually the FINAL ANSWER IS 11.", "11"),
        (r"<answer>1</answer> and \boxed{2}", "2"),  # boxed has priority over tags
        ("I have no idea.", None),
        ("", None),
    ],
)
def test_extract_math_answer(response, expected):
    assert extract_math_answer(response) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"\boxed{B}", "B"),
        (r"\boxed{\text{B}}", "B"),
        (r"$\boxed{\textbf{(C)}}$", "C"),
        (r"\boxed{(B)}", "B"),
        ("<answer>B</answer>", "B"),
        ("Answer: B", "B"),
        ("So the answer is (B).", "B"),
        ("Final answer: D", "D"),
        ("The correct answer is option **C**.", "C"),
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("Answer: A\nHmm, wait. Actually the answer is (C).", "C"),  # last statement wins
        ("<think>Answer: A</think>Answer: B", "B"),
        ("<think>Answer: A", None),
        ("Answer: Both options look plausible", None),
        ("the answer is a prime number", None),
        ("So it's probably A or B", None),
        ("Answer: E", None),  # not among the letters
    ],
)
def test_extract_choice(response, expected):
    assert extract_choice(response) == expected


def test_extract_choice_custom_letters():
    assert extract_choice("Answer: E", letters="ABCDE") == "E"
    assert extract_choice(r"\boxed{b}", letters="abcd") == "B"


# -- equivalence ---------------------------------------------------------------------------

EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\frac{1}{2}", "1/2"),
    ("0.5", r"\dfrac12"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}"),
    ("(1,3]", "(1, 3]"),
    (r"(-\infty, 3]", r"(-\infty,3]"),
    (r"\{1,2\}", r"\{2,1\}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"30^\circ", "30"),
    ("30", r"30^{\circ}"),
    (r"5 \text{ cm}", "5"),
    ("5", r"5\text{ cm}"),
    ("5", "x=5"),
    ("5", "x = 5"),
    ("10", "10."),
    ("y=2x+3", "y = 2x + 3"),
    (r"\text{Evelyn}", "Evelyn"),
]
NOT_EQUIVALENT = [
    ("1/2", "1/3"),
    (r"\frac{1}{2}", "0.51"),
    (r"2\sqrt{2}", r"\sqrt{6}"),
    ("[2,5)", "[2,5]"),
    (r"\{1,2\}", r"\{1,3\}"),
    ("(1,2)", "(2,1)"),
    ("30", r"31^\circ"),
    ("5", "x=6"),
    ("5", ""),
    ("5", None),
]


@pytest.mark.parametrize("gold, pred", EQUIVALENT)
def test_math_equal_positive(gold, pred):
    assert math_equal(gold, pred)


@pytest.mark.parametrize("gold, pred", NOT_EQUIVALENT)
def test_math_equal_negative(gold, pred):
    assert not math_equal(gold, pred)


PLAIN_NUMBERS = ["0", "-0", "1", "-1", "2", "7", "12", "100", "123456789012345", "0.5", "2.0", "1.50", "-0.75",
                 "0.333333", "3.14", "12.0", r"\frac{1}{2}", r"\dfrac{3}{4}", r"-\frac{3}{4}", r"\frac{4}{2}",
                 r"\frac{-3}{4}", "1/3", "2/4", "7/1", "x = 7", "$12$"]


def math_verify_parse(answer: str) -> list:
    """math-verify's own parse of an extracted answer, wrapped as sandlab's grader wraps it ($...$, then
    \\boxed{...} when that gives no sympy object): the reference for sandlab's shortcuts."""
    import math_verify as mv

    body = answer.replace("$", "").strip()
    config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    parsed = mv.parse(f"${body}$", extraction_config=config)
    if not any(not isinstance(p, str) for p in parsed):
        parsed = mv.parse(f"\\boxed{{{body}}}", extraction_config=config)
    return parsed


def test_integer_answers_parse_as_math_verify_parses_them():
    from sandlab.grading.math_equiv import _parse

    for answer in ["0", "-0", "7", "-50", "007", "720", "123456789012345", " 42 ", "$12$"]:
        assert _parse(answer, None) == math_verify_parse(answer), answer


def test_numeric_verdict_agrees_with_math_verify():
    """Every pair of plain numbers the shortcut decides gets math-verify's own verdict (the reference:
    math-verify's parse and verify, bypassing the shortcuts)."""
    import math_verify

    from sandlab.grading.math_equiv import numeric_verdict, strip_assignment

    decided = 0
    for gold in PLAIN_NUMBERS:
        for pred in PLAIN_NUMBERS:
            verdict = numeric_verdict(gold, pred)
            if verdict is None:
                continue
            decided += 1
            reference = bool(math_verify.verify(math_verify_parse(gold), math_verify_parse(strip_assignment(gold, pred))))
            assert verdict == reference, (gold, pred)
    assert decided > 0.5 * len(PLAIN_NUMBERS) ** 2  # most pairs never reach math-verify (different decimals do)
    assert numeric_verdict("1/3", "0.333333") is None  # math-verify rounds floats: left to it
    assert numeric_verdict("5", r"5\%") is None and numeric_verdict("012", "12") is None


def test_math_equal_off_main_thread():
    """math-verify's signal timeouts would raise off the main thread; ours must just work."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["pos"] = [math_equal(g, p) for g, p in EQUIVALENT]
            out["neg"] = [math_equal(g, p) for g, p in NOT_EQUIVALENT]
        except BaseException as exc:  # surfaced below
            out["exc"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert "exc" not in out, out.get("exc")
    assert all(out["pos"]) and not any(out["neg"])


# -- pool ----------------------------------------------------------------------------------

MIXED = [
    GradeItem(r"so \boxed{\frac{1}{2}}", "0.5"),  # plain numbers, equal: no math-verify
    GradeItem("Answer: C", "C", kind="mcq"),  # cheap
    GradeItem(r"\boxed{\sqrt{8}}", r"2\sqrt{2}"),  # needs math-verify
    GradeItem(r"\boxed{x=5}", "6"),  # plain numbers once the assignment is stripped, different
    GradeItem(r"\boxed{x^2}", "6"),  # needs math-verify, wrong
    GradeItem("<think>\\boxed{4}</think>", "4"),  # no answer in the final part
    GradeItem(r"\boxed{ 4 }", "4"),  # string fast path
    GradeItem("(B)", "C", kind="mcq"),  # cheap, wrong
]
MIXED_EXPECTED = [
    GradeResult(r"\frac{1}{2}", True, "number_match"),
    GradeResult("C", True, "choice"),
    GradeResult(r"\sqrt{8}", True, "math_verify"),
    GradeResult("x=5", False, "number_match"),
    GradeResult("x^2", False, "math_verify"),
    GradeResult(None, False, "no_answer"),
    GradeResult("4", True, "string_match"),
    GradeResult("B", False, "choice"),
]


def test_grade_many_keeps_order(pool):
    assert pool.grade_many(MIXED * 3) == MIXED_EXPECTED * 3


def test_adversarial_power_is_incorrect_and_bounded(pool):
    start = time.monotonic()
    results = pool.grade_many([GradeItem(ADVERSARIAL, "1"), GradeItem(r"\boxed{2}", "2.0")])
    elapsed = time.monotonic() - start
    assert results[0] == GradeResult("9^{9^{9^{9}}}", False, "timeout")
    assert results[1].correct
    assert elapsed < 10, elapsed
    # The pool is still healthy afterwards.
    assert pool.grade_many(MIXED) == MIXED_EXPECTED


def test_warm_up_loads_math_verify_in_a_fresh_process():
    """The pool's workers call warm_up before reporting ready. It must reach math-verify's parser even
    though plain numbers no longer need it, so the first real item's deadline is not spent on imports."""
    code = ("import sys; from sandlab.grading.math_equiv import warm_up; "
            "assert 'sympy' not in sys.modules; warm_up(); "
            "print('sympy' in sys.modules, 'latex2sympy2_extended' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_hard_kill_replaces_worker():
    """With a 0.9 s limit math-verify's (whole-second) soft timeout cannot fire first: the worker is killed."""
    with GradingPool(num_workers=1, timeout_s=0.9) as small:
        first_pid = small._workers[0].proc.pid  # private: only to prove a kill happened
        start = time.monotonic()
        results = small.grade_many([GradeItem(ADVERSARIAL, "1")])
        elapsed = time.monotonic() - start
        assert results == [GradeResult("9^{9^{9^{9}}}", False, "timeout")]
        assert elapsed < 10, elapsed
        # The replacement grades as before (with room for a loaded machine: 0.9 s is only for the kill).
        small.timeout_s = 10.0
        assert small.grade_many([GradeItem(r"\boxed{0.25}", r"\frac14")]) == [GradeResult("0.25", True, "math_verify")]
        assert small._workers[0].proc.pid != first_pid


def test_pool_from_thread(pool):
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["results"] = pool.grade_many(MIXED + [GradeItem(ADVERSARIAL, "1")])
        except BaseException as exc:
            out["exc"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert "exc" not in out, out.get("exc")
    assert out["results"] == MIXED_EXPECTED + [GradeResult("9^{9^{9^{9}}}", False, "timeout")]


def test_new_pool_created_in_thread():
    out: dict[str, object] = {}

    def run() -> None:
        try:
            with GradingPool(num_workers=1, timeout_s=5.0) as p:
                out["results"] = p.grade_many(MIXED)
        except BaseException as exc:
            out["exc"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert "exc" not in out, out.get("exc")
    assert out["results"] == MIXED_EXPECTED


def _grade_in_worker_process(timeout_s: float) -> list[GradeResult]:
    with GradingPool(num_workers=1, timeout_s=timeout_s) as p:
        killed = p.grade_many([GradeItem(ADVERSARIAL, "1")])
        p.timeout_s = 10.0  # the replacement worker grades the rest with room for a loaded machine
        return killed + p.grade_many(MIXED)


def test_pool_inside_process_pool_executor():
    start = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as ex:
        # 0.9 s (< the 1 s soft timeout) forces the hard kill path inside the executor's worker too.
        results = ex.submit(_grade_in_worker_process, 0.9).result(timeout=60)
    assert results == [GradeResult("9^{9^{9^{9}}}", False, "timeout")] + MIXED_EXPECTED
    assert time.monotonic() - start < 30


def test_grade_single_items():
    assert grade("Answer: B", "B", kind="mcq") == GradeResult("B", True, "choice")
    assert grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}") == GradeResult(r"\sqrt{8}", True, "math_verify")
    assert grade(r"\boxed{\sqrt{8}}", r"3") == GradeResult(r"\sqrt{8}", False, "math_verify")
    assert not grade(ADVERSARIAL, "1", timeout_s=3.0).correct
    with pytest.raises(ValueError, match="kind"):
        grade("x", "y", kind="code")


# -- CLI -----------------------------------------------------------------------------------


def _run_cli(lines: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "sandlab.grading.cli", *args],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_cli_grades_jsonl():
    records = [
        {"id": "a", "response": r"so \boxed{\frac{1}{2}}", "gold": "0.5"},
        {"id": "b", "response": "Answer: B", "gold": "B", "kind": "mcq"},
        {"id": "c", "response": ADVERSARIAL, "gold": 1},
        {"id": "d", "response": r"\boxed{7}", "gold": "8", "kind": "math"},
    ]
    proc = _run_cli([json.dumps(r) for r in records], "--workers", "2", "--timeout", "3")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c", "d"]
    for rec, o in zip(records, out):
        assert list(o)[: len(rec)] == list(rec)  # original fields kept, in order
        assert {k: o[k] for k in rec} == rec
    assert [o["correct"] for o in out] == [True, True, False, False]
    assert [o["pred"] for o in out] == [r"\frac{1}{2}", "B", "9^{9^{9^{9}}}", "7"]
    assert proc.stderr.strip().splitlines()[-1] == "graded 4 items, accuracy 0.5000"


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"response": "x"}', "sand-grade: line 3: missing field 'gold'"),
        ("not json", "sand-grade: line 3: not valid JSON"),
        ('{"response": "x", "gold": "1", "kind": "code"}', "sand-grade: line 3: field 'kind' must be one of"),
        ('["response", "gold"]', "sand-grade: line 3: expected a JSON object"),
    ],
)
def test_cli_rejects_malformed_line(bad_line, message):
    good = json.dumps({"response": r"\boxed{1}", "gold": "1"})
    proc = _run_cli([good, good, bad_line, good])
    assert proc.returncode == 2
    assert proc.stdout == ""  # validated before grading: nothing written
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_worker_dying_mid_item_counts_error_and_recovers():
    with GradingPool(num_workers=1, timeout_s=8.0) as p:
        victim = p._workers[0].proc  # private: simulate an out-of-memory kill of a busy worker
        killer = threading.Timer(0.5, victim.kill)
        killer.start()
        start = time.monotonic()
        results = p.grade_many([GradeItem(ADVERSARIAL, "1")])
        killer.join()
        assert results == [GradeResult("9^{9^{9^{9}}}", False, "error")]
        assert time.monotonic() - start < 5
        assert p.grade_many(MIXED) == MIXED_EXPECTED


def test_installed_sand_grade_console_script():
    exe = shutil.which("sand-grade", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("sandlab is not pip-installed (make install puts sand-grade on PATH)")
    proc = subprocess.run([exe], input=json.dumps({"response": r"\boxed{x=5}", "gold": "5"}) + "\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["correct"] is True


# -- pool size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cpus, environ, max_workers, expected",
    [
        (2, {}, None, 2),
        (96, {}, None, 8),  # the default per-process cap
        (96, {"LOCAL_WORLD_SIZE": "8"}, None, 8),  # 12 CPUs per rank, capped at 8
        (16, {"LOCAL_WORLD_SIZE": "8"}, None, 2),  # each rank takes its share, not 16 workers each
        (2, {"LOCAL_WORLD_SIZE": "8"}, None, 1),  # at least one
        (96, {"SANDLAB_GRADING_MAX_WORKERS": "32"}, None, 32),
        (96, {"SANDLAB_GRADING_MAX_WORKERS": "32"}, 4, 4),  # the argument wins over the variable
        (16, {"LOCAL_WORLD_SIZE": "not-a-number"}, None, 8),  # a malformed launcher variable counts as one rank
    ],
)
def test_default_num_workers(monkeypatch, cpus, environ, max_workers, expected):
    from sandlab.grading.pool import default_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert default_num_workers(max_workers, environ=environ) == expected


def test_pool_sizes_itself_from_affinity_not_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("SANDLAB_GRADING_MAX_WORKERS", raising=False)
    assert GradingPool().num_workers == 3  # no workers start until something is graded
    assert GradingPool(max_workers=2).num_workers == 2
    assert GradingPool(num_workers=5).num_workers == 5  # an explicit size is used as given
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert GradingPool().num_workers == 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # not Linux: the CPU count
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert GradingPool().num_workers == 4


def test_bad_max_workers_is_one_line(monkeypatch):
    monkeypatch.setenv("SANDLAB_GRADING_MAX_WORKERS", "lots")
    with pytest.raises(ValueError, match="SANDLAB_GRADING_MAX_WORKERS='lots' is not a whole number"):
        GradingPool()
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        GradingPool(max_workers=0)


# -- answer clusters (data_gen.agreement.cluster_answers) -----------------------------------

# Equivalent spellings of 1/2 and of 2, a near miss, and answers whose equivalence is neither
# transitive nor symmetric under math-verify: "(1,2)" = "1,2" = "\{2,1\}", but with gold "(1,2)" the
# prediction "\{2,1\}" is wrong while with gold "\{2,1\}" the prediction "(1,2)" is right.
TRICKY_ANSWERS = [
    "1/2", "0.5", r"\frac{1}{2}", r"\dfrac12", "0.50", r"\frac{2}{4}", "a=1/2",
    "2", "2.0", "x=2", r"\sqrt{4}", "0.51", "3",
    "(1,2)", "1,2", r"\{2,1\}", r"\{1,2\}",
    r"5\text{ cm}", "5",
]


class _CountingPool:
    """Wraps a pool to count ``grade_many`` calls (pool round trips)."""

    def __init__(self, pool: GradingPool):
        self.pool, self.calls, self.items = pool, 0, 0

    def grade_many(self, items, **kwargs):
        self.calls += 1
        self.items += len(items)
        return self.pool.grade_many(items, **kwargs)


def _greedy_reference(answers: list[str], equal) -> list[list[int]]:
    """The definition, one answer at a time: join the first cluster whose first answer (as the gold)
    it equals, else start a new cluster."""
    clusters: list[list[int]] = []
    for j, answer in enumerate(answers):
        for cluster in clusters:
            if equal(answers[cluster[0]], answer):
                cluster.append(j)
                break
        else:
            clusters.append([j])
    return clusters


def _rounds(clusters: list[list[int]]) -> int:
    """Pool calls when batching by cluster: one per representative that has later answers to compare,
    i.e. every cluster but the last, and the last if it has more than its representative (answer by
    answer it would be one call per answer after the first)."""
    return len(clusters) - 1 + (len(clusters[-1]) > 1) if clusters else 0


@pytest.fixture(scope="module")
def tricky_equal(pool):
    """``equal(gold, pred)`` over TRICKY_ANSWERS: every ordered pair graded by the pool, in one call."""
    pairs = [(g, p) for g in TRICKY_ANSWERS for p in TRICKY_ANSWERS]
    verdicts = pool.grade_many([GradeItem(f"\\boxed{{{p}}}", g) for g, p in pairs])
    table = {pair: v.correct for pair, v in zip(pairs, verdicts)}
    assert table[("\\{2,1\\}", "(1,2)")] and not table[("(1,2)", "\\{2,1\\}")]  # the asymmetry is real
    return lambda gold, pred: table[(gold, pred)]


def test_cluster_answers_pins_the_greedy_semantics(pool):
    from sandlab.data_gen.agreement import cluster_answers

    assert cluster_answers([], pool) == []
    assert cluster_answers(["7"], pool) == [[0]]
    assert cluster_answers(["1/2", "2", "0.5", r"\frac{1}{2}", "2.0", "3", r"\dfrac12"], pool) == [[0, 2, 3, 6], [1, 4], [5]]
    # Only the representative (first answer) is compared, with it as the gold.
    assert cluster_answers(["(1,2)", r"\{2,1\}"], pool) == [[0], [1]]
    assert cluster_answers([r"\{2,1\}", "(1,2)"], pool) == [[0, 1]]
    assert cluster_answers(["(1,2)", "1,2", r"\{2,1\}"], pool) == [[0, 1], [2]]
    assert cluster_answers(["B", "b", "(B)", "C"], pool, kind="mcq") == [[0, 1, 2], [3]]
    # Answers repeated verbatim are graded once per round: 2 rounds, 2 distinct comparisons each.
    counting = _CountingPool(pool)
    assert cluster_answers(["2", "1/2", "0.5", "1/2", "0.5"], counting) == [[0], [1, 2, 3, 4]]
    assert (counting.calls, counting.items) == (2, 4)


def test_cluster_answers_matches_brute_force_reference(pool, tricky_equal):
    import random

    from sandlab.data_gen.agreement import cluster_answers, cluster_answers_many

    rng = random.Random(0)
    orders = [list(TRICKY_ANSWERS), list(reversed(TRICKY_ANSWERS))]
    orders += [rng.sample(TRICKY_ANSWERS, k=rng.randint(2, len(TRICKY_ANSWERS))) for _ in range(10)]
    orders += [rng.choices(TRICKY_ANSWERS, k=8) for _ in range(10)]  # with repeats, like k votes
    counting = _CountingPool(pool)
    for answers in orders:
        expected = _greedy_reference(answers, tricky_equal)
        before = counting.calls
        assert cluster_answers(answers, counting) == expected, answers
        assert counting.calls - before == _rounds(expected)
    # Many lists at once: the same clusters, one call per round of the list with the most clusters.
    counting = _CountingPool(pool)
    assert cluster_answers_many(orders, counting) == [_greedy_reference(a, tricky_equal) for a in orders]
    assert counting.calls == max(_rounds(_greedy_reference(a, tricky_equal)) for a in orders)


# -- answer rules: several boxed answers (issue 13 item 6) -----------------------------------

# The single-answer cases of test_extract_math_answer: the multi rule must read them exactly alike.
SINGLE_ANSWER_RESPONSES = [
    (r"<think>maybe \boxed{3}</think>The final answer is $4$.", "4"),
    (r"<think>maybe \boxed{3}</think>So the answer is \boxed{4}", "4"),
    (r"maybe \boxed{3}</think>Final answer: 4", "4"),
    (r"<think>maybe \boxed{3}</think>I am not sure.", None),
    ("<answer>1</answer> later <answer>2</answer>", "2"),
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
    ("**Final Answer:** $7$", "7"),
    (r"<answer>1</answer> and \boxed{2}", "2"),
    (r"so $\boxed 5$.", "5"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{2} and a truncated \boxed{3", "2"),
    ("I have no idea.", None),
]


@pytest.mark.parametrize("response, expected", SINGLE_ANSWER_RESPONSES)
def test_one_answer_reads_the_same_under_both_rules(response, expected):
    assert extract_math_answer(response, "last_box") == expected
    assert extract_math_answer(response, "multi") == expected


@pytest.mark.parametrize(
    "response, last_box, multi",
    [
        (r"The pairs are $\boxed{(1, 2)}, \boxed{(2, 1)}$.", "(2, 1)", r"\{(1, 2), (2, 1)\}"),
        (r"$x = \boxed{6} \text{ and } \boxed{8}$", "8", r"\{6, 8\}"),
        (r"so $\boxed{8}$ or $\boxed{6}$", "6", r"\{6, 8\}"),  # the set is written in a fixed order
        (r"\boxed{5}, that is, \boxed{ 5 }.", "5", "5"),  # the same answer twice is one answer
        (r"\boxed{\boxed{5}}", "5", "5"),  # a box in a box is one box
        (r"<think>\boxed{1}, \boxed{2}</think>So \boxed{3}", "3", "3"),  # boxes in the reasoning do not count
        (r"\boxed{10,455} and \boxed{2{,}000}", "2{,}000", r"\{10455, 2000\}"),  # no stray commas in the set
        (r"\boxed{10,455}, or \boxed{10455}", "10455", "10455"),
        ("Final Answer: The final answer is $6$ and $8$. I hope it is correct.", "6 and 8", r"\{6, 8\}"),
        ("Final Answer: The final answer is $10,455$. I hope it is correct.", "10,455", "10,455"),
    ],
)
def test_several_boxes_by_rule(response, last_box, multi):
    assert extract_math_answer(response, "last_box") == last_box
    assert extract_math_answer(response) == last_box  # the extraction function's default is unchanged
    assert extract_math_answer(response, "multi") == multi


MULTI_CASES = [
    # (response, gold, correct under multi, correct under last_box)
    (r"$\boxed{(2, 1)}, \boxed{(1, 2)}$", "(1, 2), (2, 1)", True, False),  # the right set in another order
    (r"$\boxed{(1, 2)}$ and $\boxed{(2, 1)}$", "(2,1), (1,2)", True, False),
    (r"$\boxed{8} \text{ and } \boxed{6}$", "6, 8", True, False),
    (r"$\boxed{6} \text{ and } \boxed{8}$", r"\{8, 6\}", True, False),  # last_box: "8" against a set
    (r"$\boxed{-2}$, $\boxed{2}$", r"\pm 2", True, False),
    (r"$\boxed{1,000}$ and $\boxed{2,000}$", "1000, 2000", True, False),
    # A different set that ends in the same box is wrong (last_box would call it right).
    (r"$\boxed{(1, 3)}, \boxed{(2, 1)}$", "(1, 2), (2, 1)", False, False),
    (r"$\boxed{7} \text{ and } \boxed{8}$", "6, 8", False, False),
    (r"$\boxed{7} \text{ and } \boxed{8}$", "8", False, True),
    (r"$\boxed{6}, \boxed{8}, \boxed{10}$", "6, 8", False, False),  # a superset
    (r"$\boxed{10}, \boxed{455}$", "10,455", False, False),
    # One box: the rules agree, thousands separators on either side.
    (r"\boxed{10455}", "10,455", True, True),
    (r"\boxed{10,455}", "10455", True, True),
    (r"\boxed{10{,}455}", "10455", True, True),
    ("Final Answer: The final answer is $10,455$. I hope it is correct.", "10455", True, True),
    (r"\boxed{8}", "6, 8", False, False),
    (r"\boxed{6, 8}", "8, 6", True, True),
]


@pytest.mark.parametrize("response, gold, multi, last_box", MULTI_CASES)
def test_several_answers_grade_as_a_set(pool, response, gold, multi, last_box):
    got_multi, got_last = pool.grade_many([GradeItem(response, gold, rule="multi"), GradeItem(response, gold, rule="last_box")])
    assert (got_multi.correct, got_last.correct) == (multi, last_box)


def test_grade_items_default_to_the_multi_rule(pool):
    item = GradeItem(r"$\boxed{(1, 3)}, \boxed{(2, 1)}$", "(2, 1)")
    assert item.rule == "multi"
    assert pool.grade_many([item])[0] == GradeResult(r"\{(1, 3), (2, 1)\}", False, "math_verify")
    assert grade(r"\boxed{5}, \boxed{5}", "5") == GradeResult("5", True, "string_match")
    assert grade(r"\boxed{4}, \boxed{5}", "5", rule="last_box") == GradeResult("5", True, "string_match")


def test_cli_answer_rule(monkeypatch, capsys):
    import io

    from sandlab.grading import cli

    lines = json.dumps({"response": r"\boxed{7} and \boxed{8}", "gold": "8"}) + "\n"
    out = {}
    for rule in ("multi", "last_box"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
        assert cli.main(["--answer-rule", rule, "--workers", "1"]) == 0
        out[rule] = json.loads(capsys.readouterr().out)
    assert (out["multi"]["pred"], out["multi"]["correct"]) == (r"\{7, 8\}", False)
    assert (out["last_box"]["pred"], out["last_box"]["correct"]) == ("8", True)


class _ScriptedTeacher:
    """Answers each solve prompt with the scripted solutions of the problem it contains."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = script

    def generate(self, conversations, sampling, *, desc=""):
        from sandlab.inference.base import Completion

        rows = []
        for conv in conversations:
            (texts,) = [t for problem, t in self.script.items() if problem in conv[-1]["content"]]
            rows.append([Completion(t, completion_tokens=5) for t in texts])
        return rows


def test_data_generation_votes_and_checks_references_with_answer_sets(pool):
    from sandlab.config import AgreementStage, SolveStage
    from sandlab.data_gen.agreement import filter_by_agreement, filter_by_reference
    from sandlab.data_gen.solve import solve_problems

    script = {
        # Two solutions give the set {1, 3} (in either order), one gives {2, 3}: the same last box.
        "Problem one?": [r"So $\boxed{1}, \boxed{3}$.", r"So $\boxed{2}, \boxed{3}$.", r"Both $\boxed{3}$ and $\boxed{1}$."],
        # Different sets that end in the same box must not agree.
        "Problem two?": [r"So $\boxed{1}, \boxed{3}$.", r"So $\boxed{2}, \boxed{3}$."],
    }
    problems = [{"id": "p1", "problem": "Problem one?"}, {"id": "p2", "problem": "Problem two?"}]
    solved = solve_problems(_ScriptedTeacher(script), problems, SolveStage(k=3), SRC.parent)
    assert [s["answer"] for s in solved[0]["solutions"]] == [r"\{1, 3\}", r"\{2, 3\}", r"\{1, 3\}"]

    cfg = AgreementStage(min_votes=2, min_agreement=0.6, require_numeric=False)
    kept, dropped = filter_by_agreement(solved, cfg, pool, include_reference=False)
    assert [(r["id"], r["answer"], r["votes"]) for r in kept] == [("p1", r"\{1, 3\}", 2)]
    assert [(r["id"], r["reason"]) for r in dropped] == [("p2", "disagreement")]

    with_reference = [{**rec, "reference_answer": "3, 1"} for rec in solved]
    kept, dropped = filter_by_reference(with_reference, AgreementStage(mode="reference", min_votes=2), pool)
    assert [(r["id"], r["verified"]) for r in kept] == [("p1", 2)]
    assert [(r["id"], r["verified"]) for r in dropped] == [("p2", 1)]


def test_one_pass_brace_index_reads_every_box_like_the_scan():
    import random

    from sandlab.grading.extract import _BOX_TOKEN, _boxed_span, _brace_pairs

    rng = random.Random(0)
    pieces = ["\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\{", "\\}", "\\\\", "a", "1", " ", "$"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        pairs = _brace_pairs(text)
        for match in _BOX_TOKEN.finditer(text):
            assert _boxed_span(text, match, pairs) == _boxed_span(text, match), text


def test_duplicate_pairs_in_a_batch_keep_per_item_verdicts(pool):
    """Identical (gold, prediction) pairs go to a worker once; every copy still gets its own slot."""
    items = [GradeItem(r"\boxed{\frac{1}{2}}", "0.5"), GradeItem(r"\boxed{3}", "0.5")] * 4
    results = pool.grade_many(items)
    assert [r.correct for r in results] == [True, False] * 4
    assert [r.pred for r in results] == [r"\frac{1}{2}", "3"] * 4


def test_gold_cache_keeps_verdicts_per_item():
    """One gold against several predictions, parsed once: each verdict is the prediction's own."""
    from sandlab.grading import math_equiv

    math_equiv._GOLD_CACHE.clear()
    gold = r"\frac{3}{4}"
    assert math_equal(gold, "0.75")
    assert not math_equal(gold, "0.7")
    assert math_equal(gold, r"\dfrac{6}{8}")
    assert not math_equal(gold, r"\frac{4}{3}")
    assert len([k for k in math_equiv._GOLD_CACHE if k[0] == gold]) == 1
