"""Every recipe composes and passes schema validation; bad values fail with one clear message."""

import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sandlab.config import validate_recipe
from sandlab.errors import ConfigError
from sandlab.launch.slurm import JobPlanner, selected_stages

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOP_LEVEL = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem != "base")


def compose_recipe(name: str, overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [], return_hydra_config=False)


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_every_recipe_composes_and_validates(name):
    # ${now:} in the default run.dir resolves only inside a Hydra run, so pin it.
    overrides = ["run.dir=runs/x"]
    composed = compose_recipe(name, overrides)
    if "generate" not in composed.stages:  # train-only recipes name their data
        overrides.append("data.dataset_path=/tmp/x.jsonl")
    if "grpo" in composed.stages and "train" not in composed.stages:  # GRPO recipes name their SFT model
        overrides.append("rl.init_from=/tmp/sft")
    if "science" in composed.data.variants and composed.data.export.variant != "science":  # SAND-MathScience: + the science export
        overrides.append("data.mix=[/tmp/science]")
    recipe = validate_recipe(compose_recipe(name, overrides))
    assert recipe.recipe == name
    t = recipe.train
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * t.num_processes == t.global_batch_size

    # ... and becomes Slurm jobs on a GPU cluster, each a valid bash script, one per group of stages.
    on_cluster = validate_recipe(compose_recipe(name, overrides + ["cluster=example_h100"]))
    jobs = JobPlanner(on_cluster, name, overrides, Path("/tmp/runs/x")).plan()
    assert [s for job in jobs for s in job.stages] == selected_stages(on_cluster)
    for job in jobs:
        check = subprocess.run(["bash", "-n"], input=job.script, capture_output=True, text=True)
        assert check.returncode == 0, f"{job.name}: {check.stderr}"
        assert "#SBATCH --partition=gpu" in job.script and f"--config-name {name}" in job.script


@pytest.mark.parametrize("group", ["model", "teacher", "data", "train", "eval", "launcher", "cluster", "rl"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (RECIPES / group).glob("*.yaml")):
        overrides = [f"{'+' if group == 'rl' else ''}{group}={option}"]
        if group == "data" and option == "from_file":
            overrides.append("data.dataset_path=/tmp/x.jsonl")
        cfg = compose_recipe("demo", overrides + ["run.dir=runs/x"])
        validate_recipe(cfg)


def test_paper_recipes_have_amd_settings():
    for name in ("sand_math_qwen2.5_32b", "sand_mathscience_r1_distill_qwen_32b", "sand_science_r1_distill_qwen_32b"):
        r = validate_recipe(compose_recipe(name, ["run.dir=runs/x", "data.dataset_path=/tmp/x.jsonl"] if "science_r1" in name else ["run.dir=runs/x", "data.mix=[/tmp/s]"]))
        t = r.train
        assert (t.learning_rate, t.lr_scheduler_type, t.warmup_ratio, t.num_train_epochs) == (5e-6, "cosine", 0.0, 5)
        assert (t.per_device_train_batch_size, t.num_processes, t.gradient_accumulation_steps, t.global_batch_size) == (2, 8, 1, 16)
        assert (t.max_length, t.bf16, t.attn_implementation, t.save_strategy) == (32768, True, "flash_attention_2", "epoch")
        assert r.eval.sampling["aime24"].n == 64 and r.eval.sampling["aime24"].temperature == 0.7


def test_wrong_types_and_unknown_keys_fail_at_compose():
    from hydra.errors import ConfigCompositionException

    for override in ("train.learning_rate=fast", "train.learning_rat=1e-5", "data.dedup.minhash=maybe"):
        with pytest.raises(ConfigCompositionException):
            compose_recipe("demo", [override, "run.dir=runs/x"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.num_processes=3"], "global_batch_size"),
        (["stages=[generate,bake]"], "unknown stage"),
        (["teacher.backend=magic"], "teacher.backend"),
        (["teacher=openai_servers", "teacher.base_urls=[]"], "base_urls"),
        (["data.agreement.mode=vibes"], "data.agreement.mode"),
        (["run.only=[hike]"], "run.only=['hike'] names stages this recipe does not have"),
        (["cluster.setup=['export WANDB_API_KEY=abc']"], "cluster sets WANDB_API_KEY, which looks like a secret"),
        (["launcher.cost.train_mfu=0"], "launcher.cost"),
    ],
)
def test_bad_values_give_one_line_errors(overrides, message):
    cfg = compose_recipe("demo", overrides + ["run.dir=runs/x"])
    with pytest.raises(ConfigError) as info:
        validate_recipe(cfg)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_fast_variants_keep_the_token_budget_per_step_and_pack():
    for name in ("sand_math_qwen2.5_32b", "sand_mathscience_r1_distill_qwen_32b"):
        paper = validate_recipe(compose_recipe(name, ["run.dir=runs/x", "data.mix=[/tmp/s]"])).train
        fast = validate_recipe(compose_recipe(f"{name}_fast", ["run.dir=runs/x", "data.mix=[/tmp/s]"])).train
        slots = lambda t: t.per_device_train_batch_size * t.gradient_accumulation_steps * t.num_processes * t.max_length  # noqa: E731
        assert slots(fast) == slots(paper) and (fast.learning_rate, fast.num_train_epochs) == (paper.learning_rate, paper.num_train_epochs)
        assert fast.packing and fast.use_liger_kernel and fast.gradient_checkpointing and not paper.packing


def test_mathscience_needs_the_science_export(tmp_path):
    """data.variants lists science, which the math data stages cannot produce: stop before anything runs."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sandlab.launch.cli", "--config-name", "sand_mathscience_r1_distill_qwen_32b", f"run.dir={tmp_path}"],
                            capture_output=True, text=True, cwd=RECIPES.parent, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.variants includes ['science']")


def test_train_only_recipes_need_a_dataset(tmp_path, tiny_model_path):
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "train/sft.py", "--config-name", "sand_science_r1_distill_qwen_32b", f"model.path={tiny_model_path}",
                             f"run.dir={tmp_path}"], capture_output=True, text=True, cwd=RECIPES.parent, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "trains on an existing SFT dataset" in result.stderr.strip().splitlines()[-1]
