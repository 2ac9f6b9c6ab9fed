"""Every recipe composes and passes schema validation; bad values fail with one clear message; the
TRL arguments every recipe trains with are the ones recorded before TRL settings became pass-through."""

import json
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sandlab.config import validate_recipe
from sandlab.errors import ConfigError
from sandlab.launch.slurm import JobPlanner, selected_stages
from sandlab.stages import load_recipe  # validate_recipe + the stage lists

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOP_LEVEL = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem != "base")
# SFTConfig/GRPOConfig keyword arguments per recipe, recorded from the code before issue 12 (typed
# TRL fields copied one by one), not computed by the code under test.
TRL_ARGUMENTS = json.loads((Path(__file__).parent / "fixtures/trl_arguments.json").read_text())["cases"]
# Recipes added after the fixture was recorded -> the recorded recipe whose training settings they keep.
ADDED_SINCE_FIXTURE = {"sand_math_qwen2.5_32b_released": "sand_math_qwen2.5_32b",
                       "sand_mathscience_r1_distill_qwen_32b_released": "sand_mathscience_r1_distill_qwen_32b",
                       "am_code_distill": "lumina_general_data", "am_general_distill": "lumina_general_data",  # data-only, the same (unused) training groups
                       "code_demo": "demo", "paper_am_thinking": "paper_table1", "lumina_demo": "demo",
                       "sand_math_gpt_oss_teacher": "sand_math_qwen2.5_32b"}  # the same training groups
# Recipes and train groups fitted to other GPUs since: the paper's TRL arguments but for these.
FITTED_SINCE_FIXTURE = {"sand_math_qwen2.5_32b_h100": "sand_math_qwen2.5_32b", "sand_mathscience_r1_distill_qwen_32b_h100": "sand_mathscience_r1_distill_qwen_32b"}
H100_CHANGES = {"gradient_accumulation_steps": 4, "pad_to_multiple_of": 4}  # SP 4: 2 data-parallel groups x 2 x 4 = 16
TRAIN_GROUPS_SINCE_FIXTURE = {"paper_32b_h100", "cpu_sp2"}


def compose_recipe(name: str, overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [], return_hydra_config=False)


def runnable_overrides(name: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """What a recipe needs on the command line to validate: a pinned run.dir (${now:} resolves only
    inside a Hydra run), and the data or SFT model that train-only / GRPO-only recipes name."""
    overrides = ["run.dir=runs/x", *extra]
    composed = compose_recipe(name, overrides)
    if "generate" not in composed.stages:  # train-only recipes name their data
        overrides.append("data.dataset_path=/tmp/x.jsonl")
    if "grpo" in composed.stages and "train" not in composed.stages:  # GRPO recipes name their SFT model
        overrides.append("rl.init_from=/tmp/sft")
    if "science" in composed.data.variants and composed.data.export.variant != "science":  # SAND-MathScience: + the science export
        overrides.append("data.mix=[/tmp/science]")
    return overrides


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_every_recipe_composes_and_validates(name):
    overrides = runnable_overrides(name)
    recipe = load_recipe(compose_recipe(name, overrides))
    assert recipe.recipe == name

    # ... and becomes Slurm jobs on a GPU cluster, each a valid bash script, one per group of stages.
    on_cluster = validate_recipe(compose_recipe(name, overrides + ["cluster=example_h100"]))
    jobs = JobPlanner(on_cluster, name, overrides, Path("/tmp/runs/x")).plan()
    assert [s for job in jobs for s in job.stages] == selected_stages(on_cluster)
    for job in jobs:
        if job.wrap:  # the teacher servers' stop job: one scancel line
            assert job.kind == "cleanup" and job.wrap.startswith("scancel")
            continue
        check = subprocess.run(["bash", "-n"], input=job.script, capture_output=True, text=True)
        assert check.returncode == 0, f"{job.name}: {check.stderr}"
        assert "#SBATCH --partition=gpu" in job.script
        assert job.kind == "serve" or f"--config-name {name}" in job.script  # the serve job runs vLLM, not sandlab


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
        t, trl = r.train, r.train.trl
        assert (trl["learning_rate"], trl["lr_scheduler_type"], trl["warmup_steps"], trl["num_train_epochs"]) == (5e-6, "cosine", 0.0, 5)
        assert (t.per_device_train_batch_size, t.num_processes, t.gradient_accumulation_steps, t.global_batch_size) == (2, 8, 1, 16)
        assert (trl["max_length"], trl["bf16"], t.attn_implementation, trl["save_strategy"]) == (32768, True, "flash_attention_2", "epoch")
        assert r.eval.sampling["aime24"].n == 64 and r.eval.sampling["aime24"].temperature == 0.7


@pytest.mark.parametrize(
    "override, names",
    [
        ("train.num_processes=many", "train.num_processes"),
        ("train.learning_rat=1e-5", "train.learning_rat"),
        ("train.learning_rate=1e-5", "train.learning_rate"),  # a TRL setting: train.trl.learning_rate
        ("data.dedup.minhash=maybe", "data.dedup.minhash"),
        ("data.agreement.mode=bogus", "data.agreement.mode"),
        ("data.generate.style=essay", "data.generate.style"),
        ("rl.overlong=cut", "rl.overlong"),
        ("eval.table=table3", "eval.table"),
        ("eval.option_order=random", "eval.option_order"),
        ("teacher.backend=magic", "teacher.backend"),
    ],
)
def test_wrong_types_unknown_keys_and_bad_choices_fail_at_compose(override, names):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose_recipe("demo", [override, "run.dir=runs/x"])
    assert names in f"{info.value} {info.value.__cause__}"


def test_a_bad_choice_in_a_recipe_file_names_the_field(tmp_path):
    """Not only command-line overrides: a recipe file's bad value fails at compose with its full key."""
    import shutil

    from hydra.errors import ConfigCompositionException

    shutil.copytree(RECIPES, tmp_path / "recipes")
    (tmp_path / "recipes/bad.yaml").write_text("defaults:\n  - demo\n  - _self_\ndata:\n  agreement: {mode: vibes}\n")
    with pytest.raises(ConfigCompositionException) as info, initialize_config_dir(config_dir=str(tmp_path / "recipes"), version_base="1.3"):
        compose(config_name="bad", overrides=["run.dir=runs/x"])
    assert "full_key: data.agreement.mode" in str(info.value) and "expected one of [majority, reference, single, tests]" in str(info.value)


def test_choices_compare_and_serialise_as_plain_strings():
    """Code compares choices with strings; resolved configs, stage fingerprints (JSON), dataset cards
    (yaml.safe_dump) and config.yaml (OmegaConf) hold the plain value."""
    import yaml
    from omegaconf import OmegaConf

    from sandlab.config import AgreementMode, Choice, GenerationStyle, OptionOrder, OverlongPolicy, PaperTable

    for choice in (AgreementMode, GenerationStyle, OptionOrder, OverlongPolicy, PaperTable):
        assert issubclass(choice, Choice) and all(m.name == m.value for m in choice)  # OmegaConf parses a member by its name
    cfg = compose_recipe("paper_table1", ["run.dir=runs/x", "data.agreement.mode=reference"])
    r = validate_recipe(cfg)
    assert r.data.agreement.mode is AgreementMode.reference and r.eval.table is PaperTable.table1 and r.rl.overlong is OverlongPolicy.mask
    assert r.data.agreement.mode == "reference" and {"reference": 1}[r.data.agreement.mode] == 1 and f"{r.eval.table}.md" == "table1.md"
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert json.loads(json.dumps(plain["data"]["agreement"]))["mode"] == "reference"
    assert yaml.safe_dump({"mode": r.data.agreement.mode, "order": r.eval.option_order}) == "mode: reference\norder: correct_first\n"
    assert "mode: reference" in OmegaConf.to_yaml(OmegaConf.create({"agreement": plain["data"]["agreement"]}))
    # the resolved config a distributed launch re-reads (run_dir/config.yaml) validates to the same choices
    again = validate_recipe(OmegaConf.create(yaml.safe_load(OmegaConf.to_yaml(OmegaConf.create(plain)))))
    assert (again.data.agreement.mode, again.eval.table, again.eval.option_order) == (r.data.agreement.mode, r.eval.table, r.eval.option_order)


def test_eval_fingerprint_keeps_what_changes_results_not_server_addresses_or_secrets():
    """The values an evaluation's resume is checked against: the answer rule and the sampling count;
    where the servers are (a resumed Slurm job gets new ones) does not; a secret in extra_body is masked."""
    from sandlab.launch.fingerprints import stage_config

    def values(*extra):
        cfg = compose_recipe("tiny", ["run.dir=runs/x", "stages=[eval]", "eval.backend.backend=openai", *extra])
        return stage_config(cfg, load_recipe(cfg), "eval")

    here = values("eval.backend.base_urls=[http://node1:8000/v1]", "+eval.backend.extra_body.api_key=s3cret")
    moved = values("eval.backend.base_urls=[http://node7:8000/v1]", "eval.backend.max_concurrency=3", "+eval.backend.extra_body.api_key=s3cret")
    assert here == moved and here["eval.answer_rule"] == "multi" and here["eval.backend.extra_body.api_key"] == "***"
    assert "s3cret" not in json.dumps(here) and "eval.backend.base_urls" not in here
    assert values("eval.backend.base_urls=[http://node1:8000/v1]", "eval.answer_rule=last_box")["eval.answer_rule"] == "last_box"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.num_processes=3"], "global_batch_size"),
        (["stages=[generate,bake]"], "unknown stage"),
        (["teacher=openai_servers", "teacher.base_urls=[]"], "base_urls"),
        (["data.agreement.min_agreement=0"], "data.agreement.min_agreement=0.0 must be in (0, 1]"),
        (["data.partition.count=2", "data.partition.index=2"], "data.partition.index=2 must be in [0, data.partition.count=2)"),
        (["run.only=[hike]"], "run.only=['hike'] names stages this recipe does not have"),
        (["cluster.setup=['export WANDB_API_KEY=abc']"], "cluster sets WANDB_API_KEY, which looks like a secret"),
        (["launcher.cost.train_mfu=0"], "launcher.cost"),
        (["data.mix=[{path: /tmp/x.jsonl, cnt: 1}]"], "data.mix entry '/tmp/x.jsonl' has unknown keys ['cnt']"),
    ],
)
def test_bad_values_give_one_line_errors(overrides, message):
    cfg = compose_recipe("demo", overrides + ["run.dir=runs/x"])
    with pytest.raises(ConfigError) as info:
        load_recipe(cfg)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_fast_variants_keep_the_token_budget_per_step_and_pack():
    for name in ("sand_math_qwen2.5_32b", "sand_mathscience_r1_distill_qwen_32b"):
        paper = validate_recipe(compose_recipe(name, ["run.dir=runs/x", "data.mix=[/tmp/s]"])).train
        fast = validate_recipe(compose_recipe(f"{name}_fast", ["run.dir=runs/x", "data.mix=[/tmp/s]"])).train
        slots = lambda t: t.per_device_train_batch_size * t.gradient_accumulation_steps * t.num_processes * t.trl["max_length"]  # noqa: E731
        same = ("learning_rate", "num_train_epochs")
        assert slots(fast) == slots(paper) and [fast.trl[k] for k in same] == [paper.trl[k] for k in same]
        assert fast.packing and fast.trl["packing_strategy"] == "bfd" and fast.trl["use_liger_kernel"] and fast.trl["gradient_checkpointing"]
        assert not paper.packing


def test_mathscience_needs_the_science_export(tmp_path):
    """data.variants lists science, which the math data stages cannot produce: stop before anything runs."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sandlab.launch.cli", "--config-name", "sand_mathscience_r1_distill_qwen_32b", f"run.dir={tmp_path}"],
                            capture_output=True, text=True, cwd=RECIPES.parent, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.variants includes ['science']")


@pytest.mark.slow  # a train/sft.py subprocess (imports TRL)
def test_train_only_recipes_need_a_dataset(tmp_path, tiny_model_path):
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "train/sft.py", "--config-name", "sand_science_r1_distill_qwen_32b", f"model.path={tiny_model_path}",
                             f"run.dir={tmp_path}"], capture_output=True, text=True, cwd=RECIPES.parent, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "trains on an existing SFT dataset" in result.stderr.strip().splitlines()[-1]


def recipe_trl_arguments(case: str) -> dict:
    """The SFTConfig (and per stage GRPOConfig) keyword arguments the code under test builds for a case
    of the fixture, with the same run-dependent values the fixture was recorded with."""
    from sandlab.train.grpo import grpo_arguments
    from sandlab.train.sft import sft_arguments

    name = case.split()[0]
    r = validate_recipe(compose_recipe(name, runnable_overrides(name, TRL_ARGUMENTS[case]["overrides"])))
    out = {"sft": {"__class__": "SFTConfig", **sft_arguments(r.train, output_dir="OUT/checkpoints/final", run_name=f"{r.recipe}-sft", seed=r.run.seed,
                                                              report_to=["wandb"], eos_token="<EOS>")}}
    if "grpo" in TRL_ARGUMENTS[case]:
        out["grpo"] = [{"__class__": "GRPOConfig", **grpo_arguments(r.rl, stage, output_dir=f"OUT/checkpoints/grpo/stage-{i}", run_name=f"{r.recipe}-grpo-stage{i}",
                                                                     seed=r.run.seed, report_to=["wandb"])} for i, stage in enumerate(r.rl.stages)]
    return out


def test_the_fixture_covers_every_recipe_and_training_group():
    cases = set(TRL_ARGUMENTS)
    assert set(TOP_LEVEL) - set(ADDED_SINCE_FIXTURE) - set(FITTED_SINCE_FIXTURE) <= cases
    assert {f"demo train={p.stem}" for p in (RECIPES / "train").glob("*.yaml") if p.stem not in TRAIN_GROUPS_SINCE_FIXTURE} <= cases
    assert {f"tiny +rl={p.stem}" for p in (RECIPES / "rl").glob("*.yaml")} <= cases
    assert "grpo" in TRL_ARGUMENTS["grpo_sand_math_qwen2.5_32b"]


@pytest.mark.parametrize("added, recorded", sorted(ADDED_SINCE_FIXTURE.items()))
def test_released_data_recipes_keep_the_paper_trl_arguments(added, recorded):
    """Tables 1-2 from AMD's released data train exactly as the paper recipes do (only the run name differs)."""
    from sandlab.train.sft import sft_arguments

    r = load_recipe(compose_recipe(added, ["run.dir=runs/x"]))
    got = sft_arguments(r.train, output_dir="OUT/checkpoints/final", run_name=f"{recorded}-sft", seed=r.run.seed, report_to=["wandb"], eos_token="<EOS>")
    assert json.dumps({"__class__": "SFTConfig", **got}, sort_keys=True) == json.dumps(TRL_ARGUMENTS[recorded]["sft"], sort_keys=True)


@pytest.mark.parametrize("fitted, recorded", sorted(FITTED_SINCE_FIXTURE.items()))
def test_h100_recipes_change_only_the_batch_layout(fitted, recorded):
    """The _h100 recipes train with the paper's TRL arguments but the accumulation that keeps the global batch under
    sequence parallelism 4, and rows padded to a multiple of it."""
    from sandlab.train.sft import sft_arguments

    extra = ["data.mix=[/tmp/science]"] if "mathscience" in fitted else []
    r = load_recipe(compose_recipe(fitted, ["run.dir=runs/x", *extra]))
    got = sft_arguments(r.train, output_dir="OUT/checkpoints/final", run_name=f"{recorded}-sft", seed=r.run.seed, report_to=["wandb"], eos_token="<EOS>")
    expected = {**TRL_ARGUMENTS[recorded]["sft"], **H100_CHANGES}
    assert json.dumps({"__class__": "SFTConfig", **got}, sort_keys=True) == json.dumps(expected, sort_keys=True)


@pytest.mark.parametrize("case", sorted(TRL_ARGUMENTS))
def test_recipes_resolve_to_the_same_trl_arguments_as_before(case):
    """Values and their types (5.0 stays a float, not 5): JSON text of both sides must be identical."""
    expected = {k: v for k, v in TRL_ARGUMENTS[case].items() if k != "overrides"}
    assert json.dumps(recipe_trl_arguments(case), sort_keys=True) == json.dumps(expected, sort_keys=True)


@pytest.mark.slow
def test_every_recipe_trl_section_passes_the_preflight_key_check():
    from trl import GRPOConfig, SFTConfig

    from sandlab.train.validate import GRPO_RESERVED, SFT_RESERVED, check_trl_keys

    for case in sorted(TRL_ARGUMENTS):
        name = case.split()[0]
        r = validate_recipe(compose_recipe(name, runnable_overrides(name, TRL_ARGUMENTS[case]["overrides"])))
        check_trl_keys(r.train.trl, SFTConfig, where="train.trl", reserved=SFT_RESERVED)
        if "grpo" in TRL_ARGUMENTS[case]:
            check_trl_keys(r.rl.trl, GRPOConfig, where="rl.trl", reserved=GRPO_RESERVED)


@pytest.mark.parametrize(
    "trl, message",
    [
        ({"learning_rte": 1e-5}, "train.trl.learning_rte is not an SFTConfig field; did you mean learning_rate?"),
        ({"warmup_ratio": 0.03}, "train.trl.warmup_ratio is not an SFTConfig field; did you mean warmup_steps? "
                                 "(transformers 5 takes a warmup ratio as warmup_steps=<a float below 1>)"),
        ({"packing": True}, "train.trl.packing is set by sandlab (train.packing); take it out of train.trl"),
        ({"output_dir": "/x"}, "train.trl.output_dir is set by sandlab (from run.dir)"),
        ({"learning_rate": "fast"}, "train.trl.learning_rate='fast' does not fit trl.SFTConfig.learning_rate (float)"),
        ({"bf16": "yes"}, "train.trl.bf16='yes' does not fit trl.SFTConfig.bf16 (bool | None)"),
        ({"max_length": 1.5}, "train.trl.max_length=1.5 does not fit trl.SFTConfig.max_length (int | None)"),
        ({"model_init_kwargs": {"attn_implementation": "eager"}}, "train.trl.model_init_kwargs.attn_implementation is set by sandlab (train.attn_implementation)"),
    ],
)
def test_trl_key_check_is_one_line_naming_the_key(trl, message):
    from trl import SFTConfig

    from sandlab.train.validate import SFT_RESERVED, check_trl_keys

    with pytest.raises(ConfigError) as info:
        check_trl_keys(trl, SFTConfig, where="train.trl", reserved=SFT_RESERVED)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_grpo_key_check_rejects_typos_and_per_stage_settings():
    from trl import GRPOConfig

    from sandlab.train.validate import GRPO_RESERVED, check_trl_keys

    with pytest.raises(ConfigError, match=r"^rl.trl.epsilon_hi is not a GRPOConfig field; did you mean epsilon_high"):
        check_trl_keys({"epsilon_hi": 0.28}, GRPOConfig, where="rl.trl", reserved=GRPO_RESERVED)
    with pytest.raises(ConfigError, match=r"^rl.trl.max_completion_length is set by sandlab \(per stage: rl.stages\[i\].max_completion_length\)"):
        check_trl_keys({"max_completion_length": 512}, GRPOConfig, where="rl.trl", reserved=GRPO_RESERVED)
    # fine: TRL fields with values of their types, and a partial model_init_kwargs
    check_trl_keys({"beta": 0, "loss_type": "dapo", "save_strategy": "steps", "model_init_kwargs": {"use_kernels": True}}, GRPOConfig,
                   where="rl.trl", reserved=GRPO_RESERVED)


def test_a_warmup_ratio_is_a_float_warmup_steps_and_cpu_recipes_build_their_trl_configs(tmp_path):
    """transformers 5 has no warmup_ratio: warmup_steps below 1 is the ratio (small.yaml: 3% of the
    steps). The CPU recipes' settings build real SFTConfig/GRPOConfig objects."""
    from trl import GRPOConfig, SFTConfig

    from sandlab.train.grpo import build_grpo_config
    from sandlab.train.sft import build_sft_config

    small = recipe_trl_arguments("demo train=small")["sft"]
    small = {k: v for k, v in small.items() if k != "__class__"} | {"bf16": False, "use_cpu": True, "output_dir": str(tmp_path)}  # no GPU here
    assert SFTConfig(**small).get_warmup_steps(200) == 6
    tiny = validate_recipe(compose_recipe("tiny", runnable_overrides("tiny", ["+rl=cpu_tiny"])))
    sft = build_sft_config(tiny.train, output_dir=str(tmp_path), run_name="t", seed=0, report_to=[], eos_token="<|im_end|>")
    assert isinstance(sft, SFTConfig) and (sft.max_steps, sft.max_length, sft.completion_only_loss, sft.get_warmup_steps(200)) == (2, 256, True, 0)
    grpo = build_grpo_config(tiny.rl, tiny.rl.stages[1], output_dir=str(tmp_path), run_name="t", seed=0, report_to=[])
    assert isinstance(grpo, GRPOConfig) and (grpo.max_completion_length, grpo.learning_rate, grpo.beta, grpo.loss_type) == (16, 5e-6, 0.0, "dapo")


def test_cost_estimate_reads_trl_defaults_equal_to_trl():
    """The dry-run estimate avoids importing trl; its copy of SFTConfig's defaults must stay TRL's."""
    import dataclasses

    from trl import SFTConfig

    from sandlab.launch.cost import SFT_DEFAULTS

    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    assert {k: defaults[k] for k in SFT_DEFAULTS} == SFT_DEFAULTS
