"""amd/SAND-MATH: ``id, problem, solution, branch, difficulty_rating``. The solution is the teacher's
worked solution (the trace); the answer is its last ``\\boxed{}``."""

from __future__ import annotations

from typing import Any

from sandlab.grading import last_boxed
from sandlab.readers.base import Dropped, Reader, make_record

NAME = "sand_math"


def detect(row: dict[str, Any]) -> bool:
    return {"problem", "solution"} <= set(row) and bool({"difficulty_rating", "branch"} & set(row))


def read(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    solution = str(row["solution"] or "")
    answer = last_boxed(solution)
    if answer is None:
        raise Dropped("no_boxed_answer")
    problem = str(row["problem"])
    return [make_record(NAME, problem=problem, prompt=[{"role": "user", "content": problem}], trace=solution,
                        solution=f"The final answer is $\\boxed{{{answer}}}$.", row_id=row.get("id"), reference_answer=answer,
                        source="amd/SAND-MATH", reasoning_format=reasoning_format,
                        extra={k: row[k] for k in ("branch", "difficulty_rating") if k in row})]


READER = Reader(NAME, ("problem", "solution"), detect, read, "amd/SAND-MATH (problem, solution with a final \\boxed{})")
