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
