"""Generic chat formats: OpenAI ``messages``, ``prompt``/``completion`` conversations (sandlab's own SFT
export), alpaca (``instruction, input, output``) and ShareGPT (``conversations: [{from, value}]``). The
last assistant turn is the completion; any ``<think>`` / ``<answer>`` markers in it are the trace."""

from __future__ import annotations

from typing import Any

from sandlab.readers.base import Dropped, Reader, last_user, make_record, split_reasoning
from sandlab.readers.sand_post_training import alpaca_prompt

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system", "chatgpt": "assistant"}


def _is_chat(value: Any, role: str = "role") -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and role in m for m in value)


def _split_conversation(fmt: str, messages: list[dict[str, str]], row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise Dropped("no_assistant_turn")
    prompt = messages[:last]
    if not any(m["role"] == "user" for m in prompt):
        raise Dropped("no_user_turn")
    trace, solution = split_reasoning(messages[last]["content"])
    if not solution and not trace:
        raise Dropped("empty_completion")
    return [make_record(fmt, problem=last_user(prompt), prompt=prompt, trace=trace, solution=solution, row_id=row.get("id"),
                        reference_answer=row.get("reference_answer") or row.get("answer"), source=row.get("source") if isinstance(row.get("source"), str) else None,
                        reasoning_format=reasoning_format, extra={"variant": row["variant"]} if row.get("variant") else None)]


def _messages(value: Any) -> list[dict[str, str]]:
    if not _is_chat(value):
        raise Dropped("no_messages")
    return [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in value]


def read_messages(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    return _split_conversation("messages", _messages(row["messages"]), row, reasoning_format)


def read_prompt_completion(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    completion = _messages(row["completion"])
    if any(m["role"] != "assistant" for m in completion):
        raise Dropped("completion_not_assistant")
    return _split_conversation("prompt_completion", _messages(row["prompt"]) + completion, row, reasoning_format)


def read_alpaca(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    prompt = alpaca_prompt(row)
    return _split_conversation("alpaca", [*prompt, {"role": "assistant", "content": str(row["output"] or "")}], row, reasoning_format)


def read_sharegpt(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    turns = row["conversations"]
    if not _is_chat(turns, "from"):
        raise Dropped("no_conversations")
    messages = [{"role": SHAREGPT_ROLES.get(str(t["from"]), "user"), "content": str(t.get("value") or "")} for t in turns]
    system = str(row.get("system") or "").strip()
    return _split_conversation("sharegpt", ([{"role": "system", "content": system}] if system else []) + messages, row, reasoning_format)


READERS = (
    Reader("prompt_completion", ("prompt", "completion"), lambda r: _is_chat(r.get("prompt")) and _is_chat(r.get("completion")),
           read_prompt_completion, "prompt/completion conversations (sandlab's SFT export, TRL conversational)"),
    Reader("messages", ("messages",), lambda r: _is_chat(r.get("messages")), read_messages, "OpenAI messages [{role, content}]"),
    Reader("alpaca", ("instruction", "output"), lambda r: {"instruction", "output"} <= set(r), read_alpaca, "alpaca (instruction, input, output)"),
    Reader("sharegpt", ("conversations",), lambda r: _is_chat(r.get("conversations"), "from"), read_sharegpt, "ShareGPT conversations [{from, value}]"),
)
