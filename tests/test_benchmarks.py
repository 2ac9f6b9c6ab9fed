"""Benchmark loading from the local override directory (the Hub route is used on clusters)."""

import os
from pathlib import Path

import pytest

from sandlab.benchmarks import load_benchmark
from sandlab.errors import ConfigError
from sandlab.eval.harness import gold_of, render_prompt
from sandlab.eval.metrics import summarize

pytestmark = pytest.mark.skipif(not os.environ.get("SANDLAB_BENCHMARK_DIR"), reason="needs ../shared/benchmarks")


@pytest.mark.parametrize("name, rows, kind", [("aime24", 30, "math"), ("aime25", 30, "math"), ("math500", 500, "math"), ("gpqa_diamond", 198, "mcq")])
def test_local_benchmarks_load_with_common_schema(name, rows, kind):
    items = load_benchmark(name)
    assert len(items) == rows and len({i["id"] for i in items}) == rows
    assert all(i["kind"] == kind and i["problem"] for i in items)
    if kind == "mcq":
        assert all(len(i["options"]) == 4 and 0 <= i["answer"] < 4 for i in items)
    assert load_benchmark(name, limit=3) == items[:3]


def test_mcq_prompt_lists_lettered_options():
    item = load_benchmark("gpqa_diamond", limit=1)[0]
    prompt = render_prompt(item, "sys")
    assert prompt[0] == {"role": "system", "content": "sys"}
    assert all(f"{letter}) " in prompt[1]["content"] for letter in "ABCD")
    assert gold_of(item) == "ABCD"[item["answer"]]


def test_unknown_benchmark_and_bad_directory(monkeypatch, tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown benchmark"):
        load_benchmark("aime99")
    monkeypatch.setenv("SANDLAB_BENCHMARK_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="has no math500.jsonl"):
        load_benchmark("math500")


def test_summarize_pass_at_1_is_mean_over_samples_per_item():
    samples = [
        {"item_id": "a", "sample": 0, "correct": True, "completion_tokens": 10, "finish_reason": "stop", "pred": "1"},
        {"item_id": "a", "sample": 1, "correct": False, "completion_tokens": 20, "finish_reason": "length", "pred": None},
        {"item_id": "b", "sample": 0, "correct": True, "completion_tokens": 30, "finish_reason": "stop", "pred": "2"},
        {"item_id": "b", "sample": 1, "correct": True, "completion_tokens": 40, "finish_reason": "stop", "pred": "2"},
    ]
    m = summarize(samples)
    assert m["pass@1"] == pytest.approx(75.0) and m["items"] == 2 and m["samples"] == 4
    assert m["mean_output_tokens"] == 25 and m["truncated_share"] == 0.25 and m["no_answer_share"] == 0.25
