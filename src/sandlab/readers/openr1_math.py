"""open-r1/OpenR1-Math-220k: ``problem, solution, answer, problem_type, question_type, source, uuid,
generations[], correctness_math_verify[], ...``. Each generation Math-Verify marked correct becomes one
example, with id ``<uuid>-g<i>``; a row with none is dropped (``no_correct_generation``)."""

from __future__ import annotations

from typing import Any

from sandlab.readers.base import Dropped, Reader, make_record, split_reasoning
from sandlab.records import stable_id

NAME = "openr1_math"


def detect(row: dict[str, Any]) -> bool:
    return {"problem", "generations"} <= set(row) and bool({"correctness_math_verify", "uuid"} & set(row))


def read(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    generations = list(row.get("generations") or [])
    verified = list(row.get("correctness_math_verify") or [])
    if not generations:
        raise Dropped("no_generations")
    problem = str(row["problem"])
    uuid = row.get("uuid") or stable_id(NAME, problem)
    records = []
    for i, text in enumerate(generations):
        if i >= len(verified) or verified[i] is not True:
            continue
        trace, solution = split_reasoning(str(text or ""))
        if not solution:
            continue
        records.append(make_record(NAME, problem=problem, prompt=[{"role": "user", "content": problem}], trace=trace, solution=solution,
                                   row_id=f"{uuid}-g{i}", reference_answer=row.get("answer"), source=row.get("source"),
                                   reasoning_format=reasoning_format,
                                   extra={k: row[k] for k in ("problem_type", "question_type") if k in row}))
    if not records:
        raise Dropped("no_correct_generation")
    return records


READER = Reader(NAME, ("problem", "generations"), detect, read, "open-r1/OpenR1-Math-220k (one example per verified generation)")
