"""Both evaluation protocols end to end on CPU: the tiny model through the real vLLM engine on small
slices, settings taken from the frozen protocol configs (only sample counts and lengths shrunk)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SANDLAB_BENCHMARK_DIR") or ROOT.parent / "shared" / "benchmarks")


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/benchmarks")
@pytest.mark.parametrize("protocol, aime_samples, gpqa_letters", [("paper", 3, {"A"}), ("standard", 3, None)])
def test_protocol_on_tiny_model_through_vllm(tiny_model_path, tmp_path, protocol, aime_samples, gpqa_letters):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SANDLAB_BENCHMARK_DIR": str(SHARED), "WANDB_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1"}
    shrink = [f"eval.sampling.{b}.max_tokens=16" for b in ("aime24", "default")] + ["eval.sampling.aime24.n=3"]
    if protocol == "standard":
        shrink += ["eval.sampling.gpqa_diamond.max_tokens=16", "eval.sampling.gpqa_diamond.n=2"]
    result = subprocess.run([sys.executable, "eval/run.py", "--config-name", "tiny", f"eval={protocol}", f"eval.models=[{tiny_model_path}]",
                             "eval.benchmarks=[aime24,gpqa_diamond]", "eval.limit=4", "eval.backend.max_model_len=1024", "eval.backend.data_parallel_size=1",
                             "eval.backend.dtype=float32", "eval.backend.enforce_eager=true", *shrink, "stages=[eval]", f"run.dir={tmp_path}"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    name = str(tiny_model_path).replace("/", "__")
    aime = json.loads((tmp_path / f"eval/{name}/aime24/metrics.json").read_text())
    assert aime["protocol"] == protocol and aime["samples_per_item"] == aime_samples and aime["items"] == 4
    assert {"pass@1", "pass@1_std", "pass@1_ci95", "pass@2", "maj@2", "truncated_share", "no_answer_share"} <= set(aime)
    gpqa = [json.loads(x) for x in (tmp_path / f"eval/{name}/gpqa_diamond/samples.jsonl").read_text().splitlines()]
    assert gpqa[0]["prompt"][0]["content"].startswith("Please reason step by step")
    if gpqa_letters:
        assert {s["gold"] for s in gpqa} == gpqa_letters  # paper: the correct option first
    samples = [json.loads(x) for x in (tmp_path / f"eval/{name}/aime24/samples.jsonl").read_text().splitlines()]
    temperature = {"paper": 0.7, "standard": 0.6}[protocol]
    assert len(samples) == 12 and len({s["output"] for s in samples}) > 1, f"temperature {temperature} sampling should differ across samples"
