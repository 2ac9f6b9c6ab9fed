"""open-thoughts/OpenThoughts-114k. The default config: ``system, conversations: [{from, value}]``, the
assistant value ``<|begin_of_thought|>..<|end_of_thought|>`` then ``<|begin_of_solution|>..
<|end_of_solution|>``. The ``metadata`` config: ``problem, deepseek_reasoning, deepseek_solution,
ground_truth_solution, domain, source, test_cases, starter_code``."""

from __future__ import annotations

from typing import Any

from sandlab.grading import last_boxed
from sandlab.readers.base import Dropped, Reader, last_user, make_record, split_reasoning

NAME = "openthoughts"
METADATA = "openthoughts_metadata"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def detect(row: dict[str, Any]) -> bool:
    turns = row.get("conversations")
    return isinstance(turns, list) and any("<|begin_of_thought|>" in str(t.get("value", "")) for t in turns if isinstance(t, dict))


def read(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    turns = [t for t in row["conversations"] if isinstance(t, dict)]
    last = max((i for i, t in enumerate(turns) if ROLES.get(t.get("from")) == "assistant"), default=None)
    if last is None:
        raise Dropped("no_assistant_turn")
    system = str(row.get("system") or "").strip()
    prompt = ([{"role": "system", "content": system}] if system else []) + [
        {"role": ROLES.get(t.get("from"), "user"), "content": str(t.get("value") or "")} for t in turns[:last]]
    if not any(m["role"] == "user" for m in prompt):
        raise Dropped("no_user_turn")
    trace, solution = split_reasoning(str(turns[last].get("value") or ""))
    if not solution:
        raise Dropped("empty_solution")
    return [make_record(NAME, problem=last_user(prompt), prompt=prompt, trace=trace, solution=solution, row_id=row.get("id"),
                        source=row.get("source") or "open-thoughts/OpenThoughts-114k", reasoning_format=reasoning_format)]


def detect_metadata(row: dict[str, Any]) -> bool:
    return {"problem", "deepseek_reasoning", "deepseek_solution"} <= set(row)


def read_metadata(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    if not str(row.get("deepseek_solution") or "").strip():
        raise Dropped("empty_solution")
    problem = str(row["problem"])
    trace, solution = split_reasoning(str(row["deepseek_solution"]))  # the solution may carry its own markers
    reasoning = str(row.get("deepseek_reasoning") or "").strip()
    truth = str(row.get("ground_truth_solution") or "")
    return [make_record(METADATA, problem=problem, prompt=[{"role": "user", "content": problem}], trace=reasoning or trace, solution=solution,
                        row_id=row.get("id"), reference_answer=last_boxed(truth) if truth else None, test_cases=row.get("test_cases"),
                        source=row.get("source") or "open-thoughts/OpenThoughts-114k:metadata", reasoning_format=reasoning_format,
                        extra={k: row[k] for k in ("domain", "starter_code") if row.get(k)})]


READERS = (
    Reader(NAME, ("conversations",), detect, read, "open-thoughts/OpenThoughts-114k (conversations with begin/end_of_thought)"),
    Reader(METADATA, ("problem", "deepseek_reasoning", "deepseek_solution"), detect_metadata, read_metadata,
           "open-thoughts/OpenThoughts-114k, metadata config"),
)
