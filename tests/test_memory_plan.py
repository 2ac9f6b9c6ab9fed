"""The per-GPU memory plan (sandlab.launch.memory): the GPU table and its one-line errors, parameter
and activation counts against the real model and autograd, DeepSpeed's estimators wired to the job's
GPUs, and the paper recipes on H100 and MI300X clusters (the suggested change, applied, must fit)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from sandlab.errors import ConfigError
from sandlab.launch.cli import compose_recipe
from sandlab.launch.memory import (
    GIB,
    TrainLayout,
    _layer_bytes_per_token,
    _shape_from_config,
    gpu_memory_gib,
    model_shape,
    plan_recipe,
    train_plan,
)
from sandlab.models import resolve_model_path
from sandlab.runs import repo_root
from sandlab.stages import load_recipe


def cluster(**kw):
    return SimpleNamespace(**{"gpu_memory_gb": None, "gpus_per_node": 8, "gpu_type": None, **kw})


@pytest.mark.parametrize("gpu, gib", [("H100 SXM", 79.2), ("NVIDIA H100 80GB HBM3", 79.2), ("H100 NVL", 93.1), ("H200", 139.8),
                                      ("A100-SXM4-80GB", 79.2), ("A100 80 GB", 79.2), ("A100 40GB", 39.4), ("MI300X", 191.5), ("MI325X", 255.5)])
def test_gpu_memory_by_type(gpu, gib):
    assert gpu_memory_gib(cluster(gpu_type=gpu)) == gib


def test_gpu_memory_bad_input_is_one_line():
    assert gpu_memory_gib(cluster(gpu_type="B200", gpu_memory_gb=180)) == 180  # an explicit size wins
    assert gpu_memory_gib(cluster(gpus_per_node=0)) is None  # CPU-only cluster: nothing to check
    with pytest.raises(ConfigError, match=r"^cluster.gpu_type='B200' is not in sandlab's GPU memory table .*; set cluster.gpu_memory_gb$"):
        gpu_memory_gib(cluster(gpu_type="B200"))
    with pytest.raises(ConfigError, match="does not say 40 or 80 GB; set cluster.gpu_memory_gb"):
        gpu_memory_gib(cluster(gpu_type="A100"))
    with pytest.raises(ConfigError, match="no cluster.gpu_type; set cluster.gpu_type"):
        gpu_memory_gib(cluster())


@pytest.fixture(scope="module")
def tiny_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path("embedded://tiny-random-llama"))


def test_params_are_counted_like_the_real_model(tiny_config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config)  # real weights this time
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    shape = _shape_from_config(tiny_config, "test")
    assert shape.params == sum(unique.values())
    assert shape.largest_layer_params == tiny_config.vocab_size * tiny_config.hidden_size  # the (tied) embedding


@pytest.mark.parametrize("dtype, precision", [("float32", "fp32"), ("bfloat16", "bf16")])
def test_layer_activation_bytes_match_what_autograd_saves(tiny_config, dtype, precision):
    """The per-token layer formula against the bytes of every tensor autograd keeps for backward (hooks
    see each saved tensor; parameters and shared storages counted once), over the decoder stack."""
    import torch
    from transformers import AutoModelForCausalLM

    tiny_config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(tiny_config).to(getattr(torch, dtype)).train()
    tokens = 512
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, tiny_config.vocab_size, (1, tokens)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    shape = _shape_from_config(tiny_config, "test")
    estimated = _layer_bytes_per_token(shape, precision=precision, liger=False) * tokens * shape.layers
    assert estimated == pytest.approx(measured, rel=0.15)


def test_zero3_states_follow_the_gpus_of_the_job(tiny_config):
    """DeepSpeed's ZeRO-3 estimate (18 bytes per parameter over the GPUs plus the largest layer in fp32)
    for 8 and 16 GPUs, and 2 bytes per parameter with the optimizer offloaded."""
    shape = _shape_from_config(tiny_config, "test")
    base = dict(gpus_per_node=8, micro_batch=1, seq_len=128, accumulation=1, global_batch=8, zero_stage=3)
    for world in (8, 16):
        states = train_plan(shape, TrainLayout(world=world, **base)).items[0].gib * GIB
        assert states == pytest.approx(4 * shape.largest_layer_params + 18 * shape.params / world, rel=1e-6)
    offloaded = train_plan(shape, TrainLayout(world=8, offload_optimizer=True, **base)).items[0].gib * GIB
    assert offloaded == pytest.approx(4 * shape.largest_layer_params + 2 * shape.params / 8, rel=1e-6)


def test_sequence_parallelism_divides_activations_not_states(tiny_config):
    shape = _shape_from_config(tiny_config, "test")
    base = dict(world=8, gpus_per_node=8, micro_batch=2, seq_len=4096, accumulation=1, global_batch=16, zero_stage=3)
    one, four = (train_plan(shape, TrainLayout(sequence_parallel=sp, **base)) for sp in (1, 4))
    by_name = lambda plan: {i.name: i.gib for i in plan.items}  # noqa: E731
    assert by_name(four)["model states"] == by_name(one)["model states"]
    assert by_name(four)["activations: checkpoints"] == pytest.approx(by_name(one)["activations: checkpoints"] / 4)


def test_unreadable_config_falls_back_to_num_params_b_with_a_warning(caplog):
    shape = model_shape("some-org/not-cached-7b", None, 7.0, what="model")
    assert shape.params == 7_000_000_000 and "num_params_b" in shape.source
    assert "cannot be read here; estimating from model.num_params_b=7" in caplog.text
    with pytest.raises(ConfigError, match=r"set model.architecture \(HF config fields\) or model.num_params_b"):
        model_shape("some-org/not-cached", None, None, what="model")


def plan_of(recipe: str, *overrides: str):
    cfg = load_recipe(compose_recipe(recipe, [*overrides, "run.dir=/tmp/sandlab-memory-plan"]))
    return plan_recipe(cfg, repo_root(), [s for s in cfg.stages if s in ("train", "grpo", "eval")])


@pytest.mark.parametrize("recipe", ["sand_math_qwen2.5_32b", "sand_mathscience_r1_distill_qwen_32b"])
def test_paper_recipes_do_not_fit_h100_and_the_suggestion_does(recipe):
    extra = ["data.mix=[/tmp/science]"] if "mathscience" in recipe else []
    plan = plan_of(recipe, "cluster=example_h100", *extra)
    train = next(j for j in plan.jobs if j.job == "train")
    # ZeRO-3 states alone: 18 bytes x 32.8B / 8 GPUs ~ 69 GiB, plus 2 x 32k tokens of activations
    assert not train.fits and train.total_gib > 2 * train.budget_gib * 0.9
    assert train.suggestions, plan.format()
    fixed = plan_of(recipe, "cluster=example_h100", *extra, *train.suggestions[0].overrides)
    assert next(j for j in fixed.jobs if j.job == "train").fits
    assert plan_of(recipe, "cluster=example_mi300x", *extra).fits  # AMD's 192 GB GPUs hold the paper's settings


@pytest.mark.parametrize("recipe", ["sand_math_qwen2.5_32b_h100", "sand_mathscience_r1_distill_qwen_32b_h100"])
def test_h100_recipes_fit_with_the_papers_batch(recipe):
    extra = ["data.mix=[/tmp/science]"] if "mathscience" in recipe else []
    cfg = load_recipe(compose_recipe(recipe, [*extra, "run.dir=/tmp/x"]))
    paper = load_recipe(compose_recipe(recipe.removesuffix("_h100"), [*extra, "run.dir=/tmp/x"]))
    t, p = cfg.train, paper.train
    assert cfg.cluster.name == "example_h100" and t.sequence_parallel_size > 1
    assert t.global_batch_size == p.global_batch_size and t.trl["max_length"] == p.trl["max_length"] == 32768
    sequences_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * t.num_processes // t.sequence_parallel_size
    assert sequences_per_step == p.per_device_train_batch_size * p.gradient_accumulation_steps * p.num_processes
    assert plan_of(recipe, *extra).fits


def test_sequence_parallel_bad_input_is_one_line():
    with pytest.raises(ConfigError, match=r"train.sequence_parallel_size=3 does not divide train.num_processes=8"):
        load_recipe(compose_recipe("sand_math_qwen2.5_32b", ["train.sequence_parallel_size=3", "run.dir=/tmp/x"]))
    # 16 GPUs: SP 16 divides the processes but not Qwen2.5-32B's 40 heads
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=16 does not divide the model's 40 attention heads"):
        plan_of("sand_math_qwen2.5_32b", "cluster=example_h100", "train.num_processes=16", "train.sequence_parallel_size=16",
                "train.gradient_accumulation_steps=8", "launcher.train.nodes=2")


def test_grpo_plan_reserves_the_colocated_vllm_share():
    plan = plan_of("grpo_sand_math_qwen2.5_32b", "cluster=example_mi300x", "rl.init_from=/")
    grpo = next(j for j in plan.jobs if j.job == "grpo")
    assert grpo.budget_fraction == pytest.approx(0.9 - 0.3) and "colocated vLLM" in " ".join(grpo.notes)
    tokens = 16 * (512 + 32768)  # 16 completions of the longest stage per micro-batch
    assert f"{tokens:,} per GPU" in grpo.items[1].note


def test_vllm_plan_counts_full_length_sequences():
    plan = plan_of("sand_math_qwen2.5_32b", "cluster=example_mi300x")
    ev = next(j for j in plan.jobs if j.job == "vllm eval")
    weights = 32.76e9 * 2 / GIB
    kv_per_sequence = 2 * 64 * 8 * 128 * 2 * 32768 / GIB  # K and V x layers x KV heads x head dim x bf16 x tokens
    budget = 191.5 * 0.9
    free = budget - weights - next(i.gib for i in ev.items if i.name == "runtime")
    assert ev.sequences == math.floor(free / kv_per_sequence) or ev.sequences == math.floor(free / kv_per_sequence) - 1


def profiled_peak_bytes(fn) -> int:
    """The most bytes ``fn`` holds allocated at once beyond what existed before it, from the
    allocations and frees torch's profiler records (CPU)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
        _, sizes = json.loads(open(f"{tmp}/timeline.json").read())  # noqa: SIM115
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


@pytest.mark.parametrize("hidden, intermediate, heads, kv_heads", [(128, 512, 2, 1), (256, 1024, 4, 2)])
def test_reward_model_forward_peak_matches_the_plans_activations(tmp_path, hidden, intermediate, heads, kv_heads):
    """sandlab's reward model scoring one batch of full-length pairs (no padding) allocates what the plan
    counts for activations, within 5%: the profiler's peak, not the formula, is the reference."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from sandlab.config import RewardModelSettings
    from sandlab.inference.reward_model import RewardModel
    from sandlab.launch.memory import reward_model_plan

    source = resolve_model_path("embedded://tiny-random-reward")
    config = AutoConfig.from_pretrained(source, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                                        num_key_value_heads=kv_heads, head_dim=hidden // heads, num_hidden_layers=4, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path)
    settings = RewardModelSettings(model=str(tmp_path), batch_size=2, max_length=1024, dtype="bfloat16", device="cpu")
    model = RewardModel(settings)
    pairs = [([{"role": "user", "content": f"Question {i}?"}], " ".join(f"word{j}" for j in range(3000))) for i in range(2)]
    try:
        assert all(model.score(pairs).truncated)  # both cut to max_length: one unpadded batch
        measured = profiled_peak_bytes(lambda: model.score(pairs))
    finally:
        model.close()
    plan = reward_model_plan(model_shape(str(tmp_path), None, None, what="reward", classifier=True), settings, capacity_gib=80.0)
    activations = next(i.gib for i in plan.items if i.name == "activations") * GIB
    assert activations == pytest.approx(measured, rel=0.05), (activations, measured)


def test_reward_model_job_is_planned_and_a_smaller_batch_is_suggested():
    """AM's general distillation scores with Skywork-Reward-V2 (8B) at 16 x 16k tokens: it fits an H100
    alone, not a 40 GB A100 (the suggested batch does), and not beside an in-process vLLM teacher."""
    cfg = load_recipe(compose_recipe("am_general_distill", ["cluster=example_h100", "run.dir=/tmp/x"]))
    h100 = next(j for j in plan_recipe(cfg, repo_root(), cfg.stages).jobs if j.job == "reward model")
    weights = 4096 * 128257 + 32 * (4 * 4096**2 - 2 * 4096 * 3072 + 3 * 4096 * 14336 + 2 * 4096) + 4096 + 4096  # Llama-3.1-8B less its LM head
    assert h100.fits and h100.items[0].gib == pytest.approx(weights * 2 / GIB, rel=1e-3)
    small = ["cluster=example_h100", "cluster.gpu_type='A100 40GB'", "run.dir=/tmp/x"]
    cfg = load_recipe(compose_recipe("am_general_distill", small))
    a100 = next(j for j in plan_recipe(cfg, repo_root(), cfg.stages).jobs if j.job == "reward model")
    assert not a100.fits and a100.suggestions
    cfg = load_recipe(compose_recipe("am_general_distill", [*small, *a100.suggestions[0].overrides]))
    assert next(j for j in plan_recipe(cfg, repo_root(), cfg.stages).jobs if j.job == "reward model").fits
    cfg = load_recipe(compose_recipe("am_general_distill", ["cluster=example_h100", "teacher=vllm_tp8", "run.dir=/tmp/x"]))
    beside = next(j for j in plan_recipe(cfg, repo_root(), cfg.stages).jobs if j.job == "reward model")
    assert not beside.fits and beside.budget_fraction == pytest.approx(0.0) and "serve the teacher" in " ".join(beside.notes)


def test_the_reward_model_shares_a_gpu_only_with_a_teacher_that_is_loaded_before_it():
    """The in-process teacher counts against the reward model only when a stage before score that still
    has to run loads it, and only on the teacher's GPUs (0 .. tp-1)."""
    from sandlab.launch.preflight import check_memory

    def plan(*overrides, done=()):
        cfg = load_recipe(compose_recipe("am_general_distill", ["cluster=example_h100", "teacher=vllm_tp8", "run.dir=/tmp/x", *overrides]))
        run = SimpleNamespace(is_done=lambda stage: stage in done)
        return check_memory(SimpleNamespace(cfg=cfg, root=repo_root(), run=run), cfg.stages)

    with pytest.raises(ConfigError, match="reward model"):
        plan()  # solve loads the tp-8 teacher, which stays on every GPU while score runs
    resumed = plan(done=("generate", "solve", "filter"))  # a rerun after solve: the teacher never loads
    assert [j.job for j in resumed.jobs] == ["reward model"] and resumed.fits

    def reward_job(device, without=()):  # the teacher at tp 4 does not fit here itself: only the reward model's job is looked at
        cfg = load_recipe(compose_recipe("am_general_distill", ["cluster=example_h100", "teacher=vllm_tp8", "run.dir=/tmp/x",
                                                                 "teacher.tensor_parallel_size=4", f"data.score.reward_model.device={device}"]))
        return next(j for j in plan_recipe(cfg, repo_root(), [s for s in cfg.stages if s not in without]).jobs if j.job == "reward model")

    alone = reward_job("cuda:3", without=("solve",))
    assert alone.fits and reward_job("cuda:4").fits and reward_job("cuda:4").budget_fraction == pytest.approx(alone.budget_fraction)
    assert not reward_job("cuda:3").fits and reward_job("cuda:3").budget_fraction < alone.budget_fraction
