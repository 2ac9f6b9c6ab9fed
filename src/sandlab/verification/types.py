"""Test cases and verdicts exchanged with the code verifier (``sandlab.verification``)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Test styles: LiveCodeBench's two, plus HumanEval-style programs whose own asserts are the test.
STDIN = "stdin"  # the program reads ``input`` on stdin; its stdout must match ``output``
FUNCTIONAL = "functional"  # ``fn_name`` is called with newline-separated JSON arguments; ``output`` is JSON
PROGRAM = "program"  # ``input`` is code run after the solution (HumanEval's check(entry_point)); passes if it raises nothing
TEST_TYPES = (STDIN, FUNCTIONAL, PROGRAM)

# Per-test statuses.
PASS = "pass"
WRONG_ANSWER = "wrong_answer"
TIMEOUT = "timeout"
RUNTIME_ERROR = "runtime_error"
MEMORY = "memory"
NO_CODE = "no_code"  # the response has no fenced Python block (every test gets it)
INFRA_ERROR = "infra_error"  # the sandbox itself failed (retried once); never scored as a fail
SKIPPED = "skipped"  # not run: an earlier test failed and no pass fraction was asked for
STATUSES = (PASS, WRONG_ANSWER, TIMEOUT, RUNTIME_ERROR, MEMORY, NO_CODE, INFRA_ERROR, SKIPPED)


@dataclass(frozen=True)
class TestCase:
    """One test. ``input``: stdin text (stdin), newline-separated JSON arguments (functional) or test
    code (program). ``output``: expected stdout (stdin), the JSON of the expected return value
    (functional), unused (program). ``unwrap``: APPS/TACO call-based tests, whose expected value may
    be wrapped in a one-element list, also accept the unwrapped value."""

    __test__ = False  # not a pytest test class

    input: str
    output: str = ""
    testtype: str = STDIN
    unwrap: bool = False


@dataclass(frozen=True)
class CodeResult:
    """The verdict on one solution: ``passed`` (every test passed), ``pass_frac`` (passed / all tests;
    a lower bound when the run stopped at the first failure), one status per test, and whether the
    sandbox failed (``infra_error``: the result says nothing about the code)."""

    passed: bool
    pass_frac: float
    statuses: list[str] = field(default_factory=list)
    infra_error: bool = False
    sandboxed: bool = True
    detail: str = ""  # the first failure's message (exception line, "expected 3 lines, got 2", ...)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "pass_frac": round(self.pass_frac, 6), "statuses": list(self.statuses),
                "infra_error": self.infra_error, "sandboxed": self.sandboxed, "detail": self.detail}
