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
    GradeItem(r"so \boxed{\frac{1}{2}}", "0.5"),  # needs math-verify
    GradeItem("Answer: C", "C", kind="mcq"),  # cheap
    GradeItem(r"\boxed{\sqrt{8}}", r"2\sqrt{2}"),  # needs math-verify
    GradeItem(r"\boxed{x=5}", "6"),  # needs math-verify, wrong
    GradeItem("<think>\\boxed{4}</think>", "4"),  # no answer in the final part
    GradeItem(r"\boxed{ 4 }", "4"),  # string fast path
    GradeItem("(B)", "C", kind="mcq"),  # cheap, wrong
]
MIXED_EXPECTED = [
    GradeResult(r"\frac{1}{2}", True, "math_verify"),
    GradeResult("C", True, "choice"),
    GradeResult(r"\sqrt{8}", True, "math_verify"),
    GradeResult("x=5", False, "math_verify"),
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


def test_hard_kill_replaces_worker():
    """With a 0.9 s limit math-verify's (whole-second) soft timeout cannot fire first: the worker is killed."""
    with GradingPool(num_workers=1, timeout_s=0.9) as small:
        first_pid = small._workers[0].proc.pid  # private: only to prove a kill happened
        start = time.monotonic()
        results = small.grade_many([GradeItem(ADVERSARIAL, "1"), GradeItem(r"\boxed{0.25}", r"\frac14")])
        elapsed = time.monotonic() - start
        assert results == [
            GradeResult("9^{9^{9^{9}}}", False, "timeout"),
            GradeResult("0.25", True, "math_verify"),
        ]
        assert small._workers[0].proc.pid != first_pid
        assert elapsed < 10, elapsed


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
        return p.grade_many(MIXED + [GradeItem(ADVERSARIAL, "1")])


def test_pool_inside_process_pool_executor():
    start = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as ex:
        # 0.9 s (< the 1 s soft timeout) forces the hard kill path inside the executor's worker too.
        results = ex.submit(_grade_in_worker_process, 0.9).result(timeout=60)
    assert results == MIXED_EXPECTED + [GradeResult("9^{9^{9^{9}}}", False, "timeout")]
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
