"""open-r1/verifiable-coding-problems-python (and codeforces-style rows with the same field):
``problem`` (or ``prompt``), ``verification_info`` = ``{language, test_cases: [{input, output, type:
stdin_stdout|function_call, fn_name?}]}`` (a dict or a JSON string), ``metadata``. The problem text
already says how to answer, so it is kept as it is; problems only, no traces."""

from __future__ import annotations

import json
from typing import Any

from sandlab.readers.base import Dropped, Reader, make_record
from sandlab.readers.code import code_fields

NAME = "openr1_code"


def detect(row: dict[str, Any]) -> bool:
    return "verification_info" in row and ("problem" in row or isinstance(row.get("prompt"), str))


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return {}
    return meta if isinstance(meta, dict) else {}


def read(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    problem = str(row.get("problem") or row.get("prompt") or "").strip()
    if not problem:
        raise Dropped("missing_problem")
    row_id = row.get("problem_id") or row.get("id")
    meta = _metadata(row)
    fields = code_fields(row["verification_info"], where=f"openr1_code problem {row_id}", difficulty=meta.get("difficulty"),
                         platform=row.get("source"))
    return [make_record(NAME, problem=problem, prompt=[{"role": "user", "content": problem}], trace="", solution="", row_id=row_id,
                        source=row.get("source"), reasoning_format=reasoning_format, extra=fields)]


READER = Reader(NAME, ("verification_info",), detect, read, "open-r1/verifiable-coding-problems-python (verification_info test cases)")
