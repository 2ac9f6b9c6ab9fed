"""Evaluation benchmarks: loaded from the Hugging Face Hub, or from a local directory when
``SANDLAB_BENCHMARK_DIR`` is set (CI, tests and the demo use ``../shared/benchmarks``).

Every loader returns items ``{id, problem, answer, kind, options?}``; ``kind`` is ``math`` (free-form
answer graded by math-verify) or ``mcq`` (options A-D, ``answer`` is the index of the correct option).
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
}


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


def load_benchmark(name: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
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
