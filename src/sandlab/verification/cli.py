"""``sand-verify-code``: verify JSONL solutions from stdin, write them back with their verdicts.

Input lines are objects with ``response`` (a model response: its last ```python block is run; or
plain code) and either ``tests`` (``[{input, output, testtype: stdin|functional|program}]``, with
``fn_name`` for functional tests) or LiveCodeBench record fields (``public_test_cases``,
``private_test_cases``, ``metadata.func_name``) or any other test format ``normalize_tests`` reads.
Output: the same lines with ``passed``, ``pass_frac`` and ``statuses`` added. All lines are checked
before any code runs, so a malformed file gives one error line naming the line, exit code 2 and no
output. Blank lines are skipped. Like ``sand-grade``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sandlab.errors import SandlabError
from sandlab.verification.types import TestCase
from sandlab.verification.verify import CodeItem, CodeVerifier, as_test

PROG = "sand-verify-code"
TEST_FIELDS = ("public_test_cases", "private_test_cases", "input_output", "verification_info", "test_case", "test_cases")


class _BadLine(Exception):
    """A malformed input line; the message names the problem."""


def _tests_of(record: dict[str, Any], where: str) -> tuple[list[TestCase], str | None]:
    fn_name = record.get("fn_name")
    if "tests" in record:
        if not isinstance(record["tests"], list) or not record["tests"]:
            raise _BadLine("field 'tests' must be a non-empty list")
        try:
            return [as_test(t) for t in record["tests"]], fn_name
        except ValueError as exc:
            raise _BadLine(str(exc)) from None
    if not any(k in record for k in TEST_FIELDS):
        raise _BadLine(f"no tests: give 'tests' or one of {', '.join(TEST_FIELDS)}")
    from sandlab.verification.testcases import normalize_tests  # noqa: PLC0415

    try:
        return normalize_tests(record, fn_name, where=where)
    except (SandlabError, ValueError) as exc:
        raise _BadLine(str(exc)) from None


def _parse_line(text: str, lineno: int, pass_fraction: bool) -> tuple[dict[str, Any], CodeItem]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("response"), str):
        raise _BadLine("field 'response' must be a string")
    tests, fn_name = _tests_of(record, f"line {lineno}")
    if fn_name is not None and not isinstance(fn_name, str):
        raise _BadLine("field 'fn_name' must be a string")
    if len({t.testtype for t in tests}) > 1:
        raise _BadLine("tests mix several testtypes")
    if tests[0].testtype == "functional" and not fn_name:
        raise _BadLine("functional tests need 'fn_name'")
    return record, CodeItem(record["response"], tuple(tests), fn_name, pass_fraction)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sand-verify-code``; returns the exit code (0 ok, 2 bad input, 1 no sandbox)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Run JSONL solutions against their tests in bubblewrap sandboxes; "
                                     "write the lines to stdout with 'passed', 'pass_frac' and 'statuses' added.")
    parser.add_argument("--timeout", type=float, default=6.0, help="wall-clock seconds per test (default 6)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit in MB (default 1024)")
    parser.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: this process's CPUs)")
    parser.add_argument("--pass-fraction", action="store_true", help="run every test (exact pass_frac) instead of stopping at the first failure")
    parser.add_argument("--allow-unsandboxed", action="store_true", help="without bubblewrap, run with resource limits only (reports say so)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    records, items = [], []
    for lineno, text in enumerate(sys.stdin, start=1):
        if not text.strip():
            continue
        try:
            record, item = _parse_line(text, lineno, args.pass_fraction)
        except _BadLine as exc:
            print(f"{PROG}: line {lineno}: {exc}", file=sys.stderr)
            return 2
        records.append(record)
        items.append(item)
    try:
        verifier = CodeVerifier(workers=args.workers, timeout_s=args.timeout, memory_mb=args.memory_mb, allow_unsandboxed=args.allow_unsandboxed)
    except SandlabError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    with verifier:
        results = verifier.verify_many(items)
    for record, result in zip(records, results):
        record.update(passed=result.passed, pass_frac=round(result.pass_frac, 6), statuses=result.statuses)
        if not result.sandboxed:
            record["sandboxed"] = False
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    passed = sum(r.passed for r in results)
    infra = sum(r.infra_error for r in results)
    rate = f"{passed / len(results):.4f}" if results else "n/a"
    print(f"verified {len(results)} solutions, all tests passed {rate}" + (f", {infra} infrastructure errors (not scored)" if infra else "")
          + ("" if verifier.sandboxed else ", UNSANDBOXED"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
