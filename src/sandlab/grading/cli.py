"""``sand-grade``: grade JSONL responses from stdin, write them back with ``pred`` and ``correct``.

Input lines are objects with ``response``, ``gold`` and optional ``kind`` (``math``, the default,
or ``mcq``). ``--answer-rule`` says how a math response with several boxes is read (``multi``, the
default: as a set; ``last_box``: only the last box). All lines are validated before any grading, so a malformed file produces one error
line on stderr, exit code 2, and no output. Blank lines are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sandlab.grading.pool import GradingPool
from sandlab.grading.types import ANSWER_RULES, KINDS, GradeItem

PROG = "sand-grade"


class _BadLine(Exception):
    """A malformed input line; the message names the problem."""


def _parse_line(text: str, rule: str = "multi") -> tuple[dict[str, Any], GradeItem]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
    for field in ("response", "gold"):
        if field not in record:
            raise _BadLine(f"missing field {field!r}")
    if not isinstance(record["response"], str):
        raise _BadLine(f"field 'response' must be a string, got {type(record['response']).__name__}")
    gold = record["gold"]
    # Numeric golds ("gold": 42) are common in JSONL exports; anything else is a mistake.
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise _BadLine(f"field 'gold' must be a string or number, got {type(gold).__name__}")
    kind = record.get("kind", "math")
    if kind not in KINDS:
        raise _BadLine(f"field 'kind' must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return record, GradeItem(record["response"], str(gold), kind, rule)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sand-grade``; returns the exit code (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Grade JSONL lines (response, gold, kind=math|mcq) from stdin; "
        "write them to stdout with 'pred' and 'correct' added.",
    )
    parser.add_argument("--answer-rule", choices=ANSWER_RULES, default="multi",
                        help="math responses with several boxes: multi (their set, the default) or last_box (the last one)")
    parser.add_argument("--timeout", type=float, default=5.0, help="hard per-item limit in seconds (default 5)")
    parser.add_argument("--workers", type=int, default=None, help="grading processes (default: this process's CPUs, shared among LOCAL_WORLD_SIZE ranks, at most 8 or $SANDLAB_GRADING_MAX_WORKERS)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")

    records: list[dict[str, Any]] = []
    items: list[GradeItem] = []
    for lineno, text in enumerate(sys.stdin, start=1):
        if not text.strip():
            continue
        try:
            record, item = _parse_line(text, args.answer_rule)
        except _BadLine as exc:
            print(f"{PROG}: line {lineno}: {exc}", file=sys.stderr)
            return 2
        records.append(record)
        items.append(item)

    # Not `with`: entering the pool starts every worker, while grade_many starts only as many as
    # there are items that need math-verify (often none, or a handful).
    pool = GradingPool(num_workers=args.workers, timeout_s=args.timeout)
    try:
        results = pool.grade_many(items)
    finally:
        pool.close()
    out = sys.stdout
    for record, result in zip(records, results):
        record["pred"] = result.pred
        record["correct"] = result.correct
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
    n_correct = sum(r.correct for r in results)
    accuracy = f"{n_correct / len(results):.4f}" if results else "n/a"
    print(f"graded {len(results)} items, accuracy {accuracy}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
