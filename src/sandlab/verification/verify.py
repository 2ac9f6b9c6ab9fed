"""``verify_code`` and ``CodeVerifier``: run a solution's tests in sandboxes, compare in this process.

Comparison never happens inside the untrusted process (see child.py for what the harness reports):
* stdin tests: both stdouts are stripped; the line counts must match (a prefix of the expected lines
  fails, which LiveCodeBench's grader lets pass); each line must match exactly after stripping, or
  have as many whitespace-separated tokens, each Decimal-equal ("1.0" and "1" are the same number);
* functional tests: the return value arrives as JSON built from exact base types (an object whose
  ``__eq__`` is always True cannot be serialised, so it fails) and is compared with the expected
  JSON here, numbers as Decimals (tuples and lists are both JSON arrays);
* program tests (HumanEval): the test code raised nothing and the harness reported it.
The run stops at the first failing test unless a pass fraction is asked for. A sandbox that fails
to start is retried once; if it fails again its tests get ``infra_error`` (counted apart, never a fail).
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from sandlab.verification.extract import extract_code
from sandlab.verification.sandbox import Limits, RunOutcome, Sandbox
from sandlab.verification.types import (
    FUNCTIONAL,
    INFRA_ERROR,
    MEMORY,
    NO_CODE,
    PASS,
    RUNTIME_ERROR,
    SKIPPED,
    STDIN,
    TEST_TYPES,
    TIMEOUT,
    WRONG_ANSWER,
    CodeResult,
    TestCase,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodeItem:
    """One solution to verify: a model response (its last ```python block) or plain code, its tests,
    the function to call for functional tests, and whether to run every test for the pass fraction."""

    response: str
    tests: tuple[TestCase, ...]
    fn_name: str | None = None
    pass_fraction: bool = False


def as_test(test: TestCase | dict[str, Any]) -> TestCase:
    """A TestCase from itself or a ``{input, output, testtype}`` dict; ValueError names what is wrong."""
    if isinstance(test, TestCase):
        tc = test
    elif isinstance(test, dict):
        if "input" not in test:
            raise ValueError("a test has no 'input'")
        tc = TestCase(input=test["input"], output=test.get("output", ""), testtype=test.get("testtype", STDIN), unwrap=bool(test.get("unwrap", False)))
    else:
        raise ValueError(f"a test must be an object with input/output/testtype, got {type(test).__name__}")
    if tc.testtype not in TEST_TYPES:
        raise ValueError(f"testtype {tc.testtype!r} is not one of {', '.join(TEST_TYPES)}")
    if not isinstance(tc.input, str) or not isinstance(tc.output, str):
        raise ValueError("a test's input and output must be strings")
    return tc


def _same_number(a: str, b: str) -> bool:
    try:
        return Decimal(a) == Decimal(b)
    except (InvalidOperation, ValueError):
        return False


def stdout_matches(got: str, expected: str) -> tuple[bool, str]:
    """Stripped outputs with the same number of lines, each equal or token-wise Decimal-equal."""
    got_lines, want_lines = got.strip().splitlines(), expected.strip().splitlines()
    if len(got_lines) != len(want_lines):
        return False, f"expected {len(want_lines)} output lines, got {len(got_lines)}"
    for n, (a, b) in enumerate(zip(got_lines, want_lines), start=1):
        a, b = a.strip(), b.strip()
        if a == b:
            continue
        ta, tb = a.split(), b.split()
        if len(ta) != len(tb) or not all(x == y or _same_number(x, y) for x, y in zip(ta, tb)):
            return False, f"output line {n} differs"
    return True, ""


def _load(text: str) -> Any:
    return json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=Decimal)


def value_matches(got_json: str, expected_json: str, unwrap: bool = False) -> tuple[bool, str]:
    """The returned JSON equals the expected JSON (numbers as Decimals); ``unwrap`` also accepts the
    single element of a one-element expected list (APPS/TACO call-based tests)."""
    try:
        got = _load(got_json)
    except (ValueError, RecursionError):
        return False, "the return value is not valid JSON"
    try:
        expected = _load(expected_json)
    except (ValueError, RecursionError):
        return False, "the expected output is not valid JSON"
    if got == expected or (unwrap and isinstance(expected, list) and len(expected) == 1 and got == expected[0]):
        return True, ""
    return False, "wrong return value"


def judge(test: TestCase, event: dict[str, Any]) -> tuple[str, str]:
    """Status and detail of one test from the harness's report of it."""
    if event.get("status") != "ok":
        kind = event.get("kind")
        return (MEMORY if kind == "memory" else RUNTIME_ERROR), str(event.get("msg", ""))[:300]
    if test.testtype == STDIN:
        ok, detail = stdout_matches(str(event.get("out", "")), test.output)
    elif test.testtype == FUNCTIONAL:
        ok, detail = value_matches(str(event.get("res", "")), test.output, test.unwrap)
    else:
        ok, detail = True, ""
    return (PASS if ok else WRONG_ANSWER), detail


def _ended_status(outcome: RunOutcome) -> tuple[str, str]:
    """Status of the test that was running when its sandbox run ended without a result."""
    if outcome.timed_out:
        return TIMEOUT, "wall-clock limit"
    if outcome.flooded:
        return RUNTIME_ERROR, "output limit"
    code = outcome.returncode
    if code is not None and code in (-9, 137, -24, 152):  # SIGKILL/SIGXCPU: the CPU-time limit
        return TIMEOUT, "CPU-time limit"
    return RUNTIME_ERROR, f"the process ended during the test (exit status {code})"


class CodeVerifier:
    """Parallel sandboxed verification; the canary check runs once, at construction."""

    def __init__(self, *, workers: int | None = None, timeout_s: float = 6.0, memory_mb: int = 1024, allow_unsandboxed: bool = False,
                 python: str | None = None, isolate: bool = True):
        """``isolate=False`` skips bubblewrap on purpose (rlimits only: the benchmark's baseline)."""
        from sandlab.grading.pool import default_num_workers  # noqa: PLC0415

        if timeout_s <= 0 or memory_mb < 64:
            raise ValueError(f"verify: timeout_s={timeout_s} must be > 0 and memory_mb={memory_mb} at least 64")
        self.workers = workers or default_num_workers(max_workers=64)
        self.limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)
        self.sandbox = Sandbox(self.workers, python=python, allow_unsandboxed=allow_unsandboxed or not isolate, isolate=isolate)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        self._lock = threading.Lock()
        self.infra_retries = 0  # sandbox start failures retried (each one counted)
        self.infra_errors = 0  # solutions left unverified after the retry
        log.info("code verification: %d %s, %.1f s per test, %d MB", self.workers,
                 "bubblewrap sandboxes" if self.sandbox.isolated else "UNSANDBOXED workers", timeout_s, memory_mb)

    @classmethod
    def from_config(cls, cfg: Any) -> CodeVerifier:
        return cls(workers=cfg.workers, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, allow_unsandboxed=cfg.allow_unsandboxed, python=cfg.python)

    @property
    def sandboxed(self) -> bool:
        return self.sandbox.isolated

    def __enter__(self) -> CodeVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.sandbox.close()

    def verify(self, item: CodeItem) -> CodeResult:
        return self._verify(item)

    def verify_many(self, items: Iterable[CodeItem], desc: str | None = None) -> list[CodeResult]:
        items = list(items)
        results = self._executor.map(self._verify, items)
        if desc:
            from tqdm.auto import tqdm  # noqa: PLC0415

            results = tqdm(results, total=len(items), desc=desc, unit="solution", dynamic_ncols=True)
        return list(results)

    def _verify(self, item: CodeItem) -> CodeResult:
        tests = [as_test(t) for t in item.tests]
        n = len(tests)
        if not n:
            return CodeResult(False, 0.0, [], sandboxed=self.sandboxed, detail="no tests")
        modes = {t.testtype for t in tests}
        if len(modes) > 1:
            raise ValueError(f"a solution's tests mix test types {sorted(modes)}")
        mode = modes.pop()
        if mode == FUNCTIONAL and not item.fn_name:
            raise ValueError("functional tests need fn_name")
        code = extract_code(item.response)
        if code is None:
            return CodeResult(False, 0.0, [NO_CODE] * n, sandboxed=self.sandboxed, detail="no fenced Python block")
        statuses: list[str | None] = [None] * n
        details: list[str] = [""] * n
        start, retried = 0, False
        while start < n:
            idx = list(range(start, n))
            job = {"mode": mode, "code": code, "fn_name": item.fn_name, "inputs": [tests[i].input for i in idx]}

            def on_result(j: int, event: dict[str, Any], idx: list[int] = idx) -> bool:
                if not 0 <= j < len(idx):
                    return False
                status, detail = judge(tests[idx[j]], event)
                statuses[idx[j]], details[idx[j]] = status, detail
                return status != PASS and not item.pass_fraction

            with self.sandbox.slot() as slot:
                outcome = self.sandbox.run(slot, job, self.limits, len(idx), on_result)
            if not outcome.ready:
                with self._lock:
                    self.infra_retries += 1
                if not retried:
                    retried = True
                    log.warning("sandbox did not start (%s); retrying once", outcome.stderr.splitlines()[-1] if outcome.stderr else "no output")
                    continue
                with self._lock:
                    self.infra_errors += 1
                for i in idx:
                    statuses[i], details[i] = INFRA_ERROR, outcome.stderr.splitlines()[-1] if outcome.stderr else "the sandbox did not start"
                break
            missing = [i for i in idx if statuses[i] is None]
            if not missing:
                break
            if any(s not in (None, PASS) for s in statuses) and not item.pass_fraction:
                for i in missing:
                    statuses[i] = SKIPPED
                break
            status, detail = _ended_status(outcome)
            hit = missing if outcome.running == -1 else missing[:1]  # the module itself never finished: no test can run
            for i in hit:
                statuses[i], details[i] = status, detail
            if not item.pass_fraction:
                for i in missing[len(hit):]:
                    statuses[i] = SKIPPED
                break
            start = hit[-1] + 1
        final = [s or SKIPPED for s in statuses]
        passes = final.count(PASS)
        failure = next((d for s, d in zip(final, details) if s not in (PASS, SKIPPED)), "")
        return CodeResult(passed=passes == n, pass_frac=passes / n, statuses=final, infra_error=INFRA_ERROR in final,
                          sandboxed=self.sandboxed, detail=failure)


_SHARED: dict[tuple[Any, ...], CodeVerifier] = {}
_SHARED_LOCK = threading.Lock()


def _shared_verifier(timeout_s: float, memory_mb: int, allow_unsandboxed: bool) -> CodeVerifier:
    key = (timeout_s, memory_mb, allow_unsandboxed)
    with _SHARED_LOCK:
        if key not in _SHARED:
            if not _SHARED:
                atexit.register(lambda: [v.close() for v in _SHARED.values()])
            _SHARED[key] = CodeVerifier(timeout_s=timeout_s, memory_mb=memory_mb, allow_unsandboxed=allow_unsandboxed)
        return _SHARED[key]


def verify_code(response_or_code: str, tests: Iterable[TestCase | dict[str, Any]], fn_name: str | None = None, *, timeout_s: float = 6.0,
                memory_mb: int = 1024, pass_fraction: bool = False, allow_unsandboxed: bool = False) -> CodeResult:
    """Verify one solution (a response's last ```python block, or plain code) against its tests, in a
    sandbox shared by calls with the same limits; for many solutions use ``CodeVerifier.verify_many``."""
    verifier = _shared_verifier(timeout_s, memory_mb, allow_unsandboxed)
    return verifier.verify(CodeItem(response_or_code, tuple(as_test(t) for t in tests), fn_name, pass_fraction))
