"""amd/SAND-Post-Training-Dataset (configs math, science, math_dh): LLaMA-Factory alpaca records
``instruction, input, output, system``; ``output`` is the teacher's reasoning, ``\\n</think>\\n`` and the
final text, with no opening ``<think>``."""

from __future__ import annotations

from typing import Any

from sandlab.readers.base import Dropped, Reader, make_record, split_reasoning

NAME = "sand_post_training"


def alpaca_prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    user = str(row["instruction"]).strip()
    if str(row.get("input") or "").strip():
        user = f"{user}\n\n{str(row['input']).strip()}"
    system = str(row.get("system") or "").strip()
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def detect(row: dict[str, Any]) -> bool:
    return {"instruction", "output", "system"} <= set(row) and "</think>" in str(row.get("output") or "")


def read(row: dict[str, Any], reasoning_format: str) -> list[dict[str, Any]]:
    output = str(row["output"])
    if "</think>" not in output:
        raise Dropped("no_think_close")  # the trace must end somewhere, or it would train as the answer
    trace, solution = split_reasoning(output)
    prompt = alpaca_prompt(row)
    return [make_record(NAME, problem=prompt[-1]["content"], prompt=prompt, trace=trace, solution=solution, row_id=row.get("id"),
                        source=row.get("source") or "amd/SAND-Post-Training-Dataset", reasoning_format=reasoning_format)]


READER = Reader(NAME, ("instruction", "output"), detect, read, "amd/SAND-Post-Training-Dataset (alpaca; output = trace + </think> + answer)")
