"""GRPO (AM-Thinking-v1 style) on CPU: problems with answers -> pass-rate selection with the SFT model
as student (a scripted server stands in for a 32B SFT model) -> two GRPO stages on a tiny model with
the shared grader as reward. Plus the reward and overlong settings on their own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_stub import ChatStub

from sandlab.config import OverlongPolicy, RLConfig, RLStage
from sandlab.errors import ConfigError
from sandlab.train.grpo import GraderReward, build_grpo_config, load_rl_dataset

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [("What is 12 plus 30?", "42"), ("What is 3 times 7?", "21"), ("What is half of 50?", "25"), ("Which option is a noble gas?\n\nA) Neon\nB) Iron", "A")]


@pytest.mark.slow
def test_grader_reward_and_prompt_building(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"problem": "What is 12 plus 30?", "reference_answer": "42"},
            {"prompt": [{"role": "user", "content": "Pick one"}], "answer": "B", "source": {"answer_kind": "mcq"}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_rl_dataset(str(path), "Reason.")
    assert ds[0]["prompt"] == [{"role": "system", "content": "Reason."}, {"role": "user", "content": "What is 12 plus 30?"}]
    assert (ds[0]["answer"], ds[1]["answer_kind"]) == ("42", "mcq")
    reward = GraderReward()
    try:
        completions = [[{"role": "assistant", "content": c}] for c in ("so \\boxed{42}", "\\boxed{42.0}", "\\boxed{41}", "no answer", "The answer is (B).", "\\boxed{A}")]
        assert reward(completions, answer=["42"] * 4 + ["B", "B"], answer_kind=["math"] * 4 + ["mcq", "mcq"]) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    finally:
        reward.close()
    stage = RLStage(max_completion_length=64, learning_rate=1e-6, max_steps=1)
    cpu = {"use_cpu": True, "bf16": False, "use_vllm": False, "beta": 0.0, "epsilon_high": 0.28, "loss_type": "dapo"}
    masked = build_grpo_config(RLConfig(overlong=OverlongPolicy.mask, attn_implementation="sdpa", trl=cpu), stage, output_dir=str(tmp_path), run_name="t", seed=0, report_to=[])
    penalty = build_grpo_config(RLConfig(overlong=OverlongPolicy.penalty, attn_implementation="sdpa", trl=cpu), stage, output_dir=str(tmp_path), run_name="t", seed=0, report_to=[])
    assert masked.mask_truncated_completions and not penalty.mask_truncated_completions and penalty.reward_weights == [1.0, 1.0]
    assert (masked.beta, masked.epsilon_high, masked.loss_type, masked.max_completion_length) == (0.0, 0.28, "dapo", 64)
    assert masked.model_init_kwargs == {"attn_implementation": "sdpa", "dtype": "float32"}  # dtype follows rl.trl.bf16
    with pytest.raises(ConfigError, match="rl.trl.beta_ is not a GRPOConfig field; did you mean beta"):
        build_grpo_config(RLConfig(trl={**cpu, "beta_": 0.1}), stage, output_dir=str(tmp_path), run_name="t", seed=0, report_to=[])


def sft_student(body):
    """The SFT model: always right on 12+30 (too easy), never on half of 50 (too hard), half the time otherwise."""
    prompt, n = body["messages"][-1]["content"], body.get("n", 1)
    if "12 plus 30" in prompt:
        answers = ["42"] * n
    elif "half of 50" in prompt:
        answers = ["24"] * n
    elif "3 times 7" in prompt:
        answers = ["21", "20"] * n
    else:
        answers = ["A", "B"] * n
    return [f"Thinking.\n\\boxed{{{a}}}" for a in answers[:n]]


@pytest.mark.slow
def test_passrate_selection_then_two_grpo_stages(tiny_model_path, tmp_path):
    source = tmp_path / "problems.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "problem": q, "answer": a}) + "\n" for i, (q, a) in enumerate(PROBLEMS)))
    stub = ChatStub(sft_student)
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    try:
        result = subprocess.run([sys.executable, "-m", "sandlab.launch.cli", "--config-name", "tiny", "+rl=cpu_tiny", f"rl.init_from={tiny_model_path}",
                                 "stages=[generate,passrate,grpo]", f"data.generate.source={source}",
                                 "data.passrate.student.backend=openai", f"data.passrate.student.base_urls=[{stub.url}]", "data.passrate.student.model=tuned",
                                 "data.passrate.m=4", "data.passrate.prompt=data_gen/prompts/solve.txt", f"run.dir={run_dir}"],
                                capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    finally:
        stub.close()
    assert result.returncode == 0, result.stderr[-3000:]
    kept = [json.loads(line) for line in (run_dir / "data/passrate.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in kept) == ["p1", "p3"] and all(r["pass_rate"] == 0.5 for r in kept)
    log = result.stdout + result.stderr
    assert "GRPO stage 0: max_completion_length=8" in log and "GRPO stage 1: max_completion_length=16" in log
    assert f"from {run_dir / 'checkpoints/grpo/stage-0'}" in log  # stage 2 starts from stage 1's weights
    for index, limit in ((0, 8), (1, 16)):
        stage = run_dir / f"checkpoints/grpo/stage-{index}"
        assert (stage / "stage.done").read_text() == str(limit) and (stage / "model.safetensors").exists()
    assert "rewards/grader_reward/mean" in log
    done = json.loads((run_dir / "stages/grpo.done").read_text())
    assert done["output"].endswith("stage-1") and done["dataset"].endswith("passrate.jsonl")


def test_grpo_preflight_checks_trl_keys_and_the_attention_kernel():
    import importlib.util

    from sandlab.train.validate import validate_grpo

    cpu = {"use_cpu": True, "bf16": False, "use_vllm": False}
    assert validate_grpo(RLConfig(attn_implementation="sdpa", trl=cpu))["trl"] == ["bf16", "use_cpu", "use_vllm"]
    with pytest.raises(ConfigError, match=r"^rl.trl.epsilon_hgh is not a GRPOConfig field; did you mean epsilon_high, epsilon or adam_epsilon\?$"):
        validate_grpo(RLConfig(attn_implementation="sdpa", trl={**cpu, "epsilon_hgh": 0.28}))
    with pytest.raises(ConfigError, match=r"^rl.trl.num_generations is set by sandlab \(rl.num_generations\)"):
        validate_grpo(RLConfig(attn_implementation="sdpa", trl={**cpu, "num_generations": 4}))
    if importlib.util.find_spec("flash_attn") is None:  # the CPU machines this suite runs on
        with pytest.raises(ConfigError, match="rl.attn_implementation=flash_attention_2 needs flash-attn"):
            validate_grpo(RLConfig(trl=cpu))


CODE_PROMPTS = [
    {"id": "c1", "problem": "Read two integers and print their sum.", "answer_kind": "code",
     "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}, {"input": "5 5\n", "output": "10\n", "testtype": "stdin"}]},
    {"id": "c2", "problem": "Implement double(x).", "answer_kind": "code", "fn_name": "double",
     "tests": [{"input": "4", "output": "8", "testtype": "functional"}]},
    {"id": "m1", "problem": "What is 12 plus 30?", "answer": "42"},
]


def test_code_reward_next_to_the_grader_in_one_batch(tmp_path):
    from sandlab.config import CodeRewardMode, CodeVerifyConfig
    from sandlab.train.grpo import CodeReward

    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CODE_PROMPTS))
    ds = load_rl_dataset(str(path), "")
    assert ds["answer_kind"] == ["code", "code", "math"] and json.loads(ds[1]["tests"])[0]["testtype"] == "functional"
    rows = [ds[0], ds[0], ds[1], ds[2], ds[2]]
    completions = ["```python\na, b = map(int, input().split())\nprint(a + b)\n```",
                   "```python\na, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n```",
                   "```python\ndef double(x):\n    return 2 * x\n```", "\\boxed{42}", "\\boxed{41}"]
    batch = {key: [r[key] for r in rows] for key in ("answer", "answer_kind", "tests", "fn_name")}
    code, fraction, grader = (CodeReward(CodeVerifyConfig(workers=1, timeout_s=3)), CodeReward(CodeVerifyConfig(workers=1, timeout_s=3), CodeRewardMode.pass_fraction),
                              GraderReward())
    try:
        assert code(completions, **batch) == [1.0, 0.0, 1.0, None, None]  # binary: every test must pass
        assert fraction(completions, **batch) == [1.0, 0.5, 1.0, None, None]
        assert grader(completions, **batch) == [None, None, None, 1.0, 0.0]
    finally:
        for reward in (code, fraction, grader):
            reward.close()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "Write code.", "answer_kind": "code"}) + "\n")
    with pytest.raises(ConfigError, match="code prompt without tests"):
        load_rl_dataset(str(bad), "")


@pytest.mark.slow
def test_grpo_trains_a_tiny_model_on_code_and_math_prompts(tiny_model_path, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CODE_PROMPTS[:2] + CODE_PROMPTS[2:] * 2))
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "sandlab.launch.cli", "--config-name", "tiny", "+rl=cpu_tiny", f"rl.init_from={tiny_model_path}",
                             "stages=[grpo]", f"rl.dataset_path={path}", "rl.stages=[{max_completion_length: 16, learning_rate: 1.0e-5, max_steps: 2}]",
                             "verify.workers=1", f"run.dir={run_dir}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "rewards/code_reward/mean" in log and "rewards/grader_reward/mean" in log
    assert (run_dir / "checkpoints/grpo/stage-0/stage.done").exists()
