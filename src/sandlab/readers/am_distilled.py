"""a-m-team/AM-DeepSeek-R1-Distilled-1.4M (``.jsonl.zst``): ``messages: [{role, content, info}]``; the
user turn's ``info`` has ``source, reference_answer, test_case``; the assistant content is
``<think>..</think><answer>..</answer>`` and its ``info`` has ``think_content, answer_content``.
Rows with a ``test_case`` are code records (``answer_kind: code``, normalized ``tests``)."""

from __future__ import annotations

from typing import Any

from sandlab.readers.base import Dropped, Reader, last_user, make_record, split_reasoning
from sandlab.readers.code import code_fields

NAME = "am_distilled"


def detect(row: dict[str, Any]) -> bool:
    messages = row.get("messages")
    return isinstance(messages, list) and any(isinstance(m, dict) and "info" in m for m in messages)


def read(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    messages = [m for m in row["messages"] if isinstance(m, dict)]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise Dropped("no_assistant_turn")
    prompt = [{"role": m["role"], "content": str(m.get("content") or "")} for m in messages[:last]]
    if not any(m["role"] == "user" for m in prompt):
        raise Dropped("no_user_turn")
    assistant = messages[last]
    info = assistant.get("info") or {}
    if info.get("think_content") is not None and info.get("answer_content") is not None:
        trace, solution = str(info["think_content"]).strip(), str(info["answer_content"]).strip()
    else:
        trace, solution = split_reasoning(str(assistant.get("content") or ""))
    if not solution:
        raise Dropped("empty_answer")
    user_info = next((m.get("info") or {} for m in reversed(messages[:last]) if m.get("role") == "user"), {})
    row_id = row.get("id") or row.get("uuid")
    # Code rows (a test_case in TACO/APPS shape) become code records with normalized tests; a malformed
    # test_case still leaves a usable SFT row (the tests stage drops it as malformed_tests).
    code = None
    if user_info.get("test_case"):
        try:
            code = code_fields(user_info["test_case"], where=f"am_distilled row {row_id}")
        except Dropped:
            pass
    return [make_record(NAME, problem=last_user(prompt), prompt=prompt, trace=trace, solution=solution, row_id=row_id,
                        reference_answer=user_info.get("reference_answer"), test_cases=user_info.get("test_case"),
                        source=user_info.get("source"), reasoning_format=reasoning_format, extra=code)]


READER = Reader(NAME, ("messages",), detect, read, "a-m-team/AM-DeepSeek-R1-Distilled-1.4M (messages with info)")
