"""livecodebench/code_generation_lite: ``question_title, question_content, platform, question_id,
contest_date, starter_code, difficulty, public_test_cases`` (a JSON string), ``private_test_cases``
(base64(zlib(pickle(JSON)))) and ``metadata`` (JSON with ``func_name`` for LeetCode). Problems only,
no traces: a distillation source (``data.generate.source``) for ``data.agreement.mode=tests``."""

from __future__ import annotations

from typing import Any

from sandlab.readers.base import Reader, make_record
from sandlab.readers.code import code_fields, code_problem_text

NAME = "livecodebench"


def detect(row: dict[str, Any]) -> bool:
    return "question_content" in row and ("public_test_cases" in row or "private_test_cases" in row)


def read(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    qid = row.get("question_id")
    fields = code_fields(row, where=f"livecodebench question {qid}", starter_code=row.get("starter_code"), difficulty=row.get("difficulty"),
                         platform=row.get("platform"), contest_date=row.get("contest_date"), title=row.get("question_title"))
    problem = code_problem_text(str(row["question_content"]), fields["starter_code"], fields["fn_name"])
    return [make_record(NAME, problem=problem, prompt=[{"role": "user", "content": problem}], trace="", solution="", row_id=qid,
                        source=row.get("platform"), reasoning_format=reasoning_format, extra=fields)]


READER = Reader(NAME, ("question_content",), detect, read, "livecodebench/code_generation_lite (public/private test cases, metadata.func_name)")
