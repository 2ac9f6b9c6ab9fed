"""What the code-problem readers share: the problem text a model solves (the statement, then how to
answer: read stdin or complete the starter code, as LiveCodeBench's prompts say) and the fields of a
code record (``answer_kind: code``, normalized ``tests``, ``fn_name``, ``starter_code``, ...)."""

from __future__ import annotations

from typing import Any

from sandlab.errors import ConfigError
from sandlab.readers.base import Dropped
from sandlab.verification.testcases import normalize_tests, tests_to_dicts

STDIN_FORMAT = ("Read the input from stdin, solve the problem and write the answer to stdout (do not test on the sample inputs). "
                "Enclose your code within delimiters as follows:\n```python\n# YOUR CODE HERE\n```")
STARTER_FORMAT = "You will use the following starter code to write the solution to the problem and enclose your code within delimiters."
FUNCTION_FORMAT = ("Implement the function `{fn_name}`; it is called with the test arguments and its return value is checked "
                   "(do not read stdin). Enclose your code within delimiters as follows:\n```python\n# YOUR CODE HERE\n```")


def code_problem_text(statement: str, starter_code: str | None, fn_name: str | None) -> str:
    """The statement, then the answer format: complete the starter code, implement ``fn_name``, or read stdin."""
    statement = statement.strip()
    if starter_code and starter_code.strip():
        return f"{statement}\n\n{STARTER_FORMAT}\n```python\n{starter_code.rstrip()}\n```"
    if fn_name:
        return f"{statement}\n\n{FUNCTION_FORMAT.format(fn_name=fn_name)}"
    return f"{statement}\n\n{STDIN_FORMAT}"


def code_fields(raw_tests: Any, fn_name: str | None = None, *, where: str, starter_code: str | None = None, **meta: Any) -> dict[str, Any]:
    """The code-record fields of a row's tests; malformed tests drop the row (``malformed_tests: <why>``)."""
    try:
        tests, fn = normalize_tests(raw_tests, fn_name, where=where)
    except ConfigError as exc:
        raise Dropped(f"malformed_tests: {exc}") from None
    return {"answer_kind": "code", "tests": tests_to_dicts(tests), "fn_name": fn, "starter_code": starter_code or "",
            **{k: v for k, v in meta.items() if v not in (None, "")}}
