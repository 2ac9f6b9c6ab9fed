"""codeparrot/apps and BAAI/TACO: ``question, input_output`` (a JSON string ``{inputs, outputs,
fn_name?}``), ``starter_code``, ``difficulty``, ``url`` (TACO also ``source``, ``date``). Problems only;
the reference ``solutions`` are code without reasoning, so they are not used as traces."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from sandlab.readers.base import Reader, make_record
from sandlab.readers.code import code_fields, code_problem_text

NAME = "apps"


def detect(row: dict[str, Any]) -> bool:
    return "input_output" in row and "question" in row


def _platform(row: dict[str, Any]) -> str | None:
    if row.get("source"):
        return str(row["source"]).lower()
    host = urlparse(str(row.get("url") or "")).hostname or ""
    parts = host.removeprefix("www.").split(".")
    return parts[0] if parts[0] else None


def read(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    row_id = row.get("problem_id") if row.get("problem_id") not in (None, "") else row.get("id")
    fields = code_fields(row["input_output"], where=f"apps problem {row_id}", starter_code=row.get("starter_code"), difficulty=row.get("difficulty"),
                         platform=_platform(row), contest_date=row.get("date"))
    problem = code_problem_text(str(row["question"]), fields["starter_code"], fields["fn_name"])
    return [make_record(NAME, problem=problem, prompt=[{"role": "user", "content": problem}], trace="", solution="",
                        row_id=None if row_id in (None, "") else f"apps-{row_id}", source=fields.get("platform"), reasoning_format=reasoning_format,
                        extra=fields)]


READER = Reader(NAME, ("question", "input_output"), detect, read, "codeparrot/apps, BAAI/TACO (question, input_output JSON)")
