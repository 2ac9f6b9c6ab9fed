"""What every reader shares: the sandlab record a raw row becomes, and how a reasoning trace is split
out of a teacher's output and rewritten into the student's trace format (``train.reasoning_format``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandlab.records import Record, stable_id

THINK_RE = re.compile(r"^\s*(?:<think>)?(.*?)</think>(.*)$", re.S)  # the opening <think> may be absent (SAND, R1 prefill)
ANSWER_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
THOUGHT_RE = re.compile(r"<\|begin_of_thought\|>(.*?)(?:<\|end_of_thought\|>|$)", re.S)
SOLUTION_RE = re.compile(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.S)


class Dropped(Exception):
    """A row that cannot become a record; the message is its reason (counted, never a crash)."""


def split_reasoning(text: str) -> tuple[str, str]:
    """(trace, final answer text) of a teacher output in any of the known trace formats: ``<think>..
    </think>answer`` (opening tag optional), ``..</think><answer>..</answer>`` (AM) and
    ``<|begin_of_thought|>..<|end_of_thought|><|begin_of_solution|>..<|end_of_solution|>``
    (OpenThoughts). Text without markers is all answer, with an empty trace."""
    text = text or ""
    thought = THOUGHT_RE.search(text)
    if thought:
        solution = SOLUTION_RE.search(text)
        rest = solution.group(1) if solution else text[thought.end():]
        return thought.group(1).strip(), rest.strip()
    think = THINK_RE.match(text)
    if think:
        trace, rest = think.group(1), think.group(2)
        answer = ANSWER_RE.search(rest)
        return trace.strip(), (answer.group(1) if answer else rest).strip()
    answer = ANSWER_RE.search(text)
    if answer:
        return text[: answer.start()].strip(), answer.group(1).strip()
    return "", text.strip()


def render_trace(trace: str, solution: str, reasoning_format: str = "think") -> str:
    """The assistant content the student trains on: ``think`` = ``<think>\\n..\\n</think>\\n\\n`` + answer
    (what R1-distilled students expect); ``think_answer`` = AM's ``<think>..</think><answer>..</answer>``.
    An empty trace still gets its (empty) block, so every sample has the same shape."""
    trace, solution = (trace or "").strip(), (solution or "").strip()
    if reasoning_format == "think_answer":
        return f"<think>\n{trace}\n</think>\n<answer>\n{solution}\n</answer>"
    if reasoning_format == "think":
        return f"<think>\n{trace}\n</think>\n\n{solution}"
    raise ValueError(f"unknown reasoning format {reasoning_format!r}")


def make_record(fmt: str, *, problem: str, prompt: list[dict[str, str]], trace: str, solution: str, row_id: Any = None,
                reference_answer: Any = None, test_cases: Any = None, source: Any = None, reasoning_format: str = "think",
                extra: dict[str, Any] | None = None) -> Record:
    """One sandlab record: the problem and its checks, the trace and answer apart, and the SFT
    conversation with the trace rewritten into ``reasoning_format``."""
    content = render_trace(trace, solution, reasoning_format)
    return {
        "id": str(row_id) if row_id not in (None, "") else stable_id(fmt, problem, content),
        "problem": problem,
        "reference_answer": None if reference_answer in (None, "") else str(reference_answer),
        "test_cases": test_cases or None,
        "trace": trace,
        "solution": solution,
        "source": str(source) if source else fmt,
        "format": fmt,
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": content}],
        **(extra or {}),
    }


def last_user(prompt: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")


@dataclass(frozen=True)
class Reader:
    """A dataset format: ``detect(row)`` says whether a row has its fields, ``read(row, reasoning_format)``
    returns its records (several for OpenR1's generations) or raises Dropped."""

    name: str
    required: tuple[str, ...]
    detect: Callable[[dict[str, Any]], bool]
    read: Callable[[dict[str, Any], str], list[Record]]
    description: str = ""
