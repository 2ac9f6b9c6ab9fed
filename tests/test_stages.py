"""The stage registry: declarations are consistent, every table derives from them, and a stage added as
one new module runs in a recipe, alone, and resumes shard by shard like the built-in ones."""

import json
import sys
import textwrap
from pathlib import Path

import pytest

from sandlab import stages as registry_module
from sandlab.errors import ConfigError, EmptyDatasetError
from sandlab.launch.cli import compose_recipe
from sandlab.launch.partitions import leading_partitionable
from sandlab.launch.pipeline import Pipeline
from sandlab.launch.slurm import group_stages
from sandlab.records import read_jsonl, write_jsonl
from sandlab.stages import Kind, get_stage, load_recipe, registry

ROOT = Path(__file__).resolve().parents[1]


def test_declarations_are_consistent():
    stages = registry()
    assert list(stages) == [s.name for s in stages.values()]  # keyed by their own names
    for stage in stages.values():
        assert callable(stage.run), stage.name
        if stage.partitionable:  # a slice of the input only makes sense record by record
            assert stage.per_record and stage.kind is Kind.DATA, stage.name
        if stage.kind is Kind.DATA:
            assert stage.hint, f"data stage {stage.name} needs a hint for when it keeps nothing"
    base = load_recipe(compose_recipe("sand_mathscience_r1_distill_qwen_32b", ["run.dir=runs/x", "data.mix=[/tmp/s]"]))
    order = list(stages)
    assert [order.index(s) for s in base.stages] == sorted(order.index(s) for s in base.stages)  # recipes list stages in run order


def test_config_sections_exist_in_the_schema():
    cfg = compose_recipe("sand_math_qwen2.5_32b", ["run.dir=runs/x"])  # generation mode: the adaptive solve adds the filter's keys
    recipe = load_recipe(cfg)
    for stage in registry().values():
        for key in stage.config_keys(recipe):
            node = cfg
            for part in key.split("."):
                assert part in node, f"stage {stage.name}: {key} is not a config key"
                node = node[part]


def test_tables_derive_from_the_declarations():
    recipe = ["generate", "solve", "filter", "difficulty", "dedup", "decontam", "export", "train", "grpo", "eval", "report"]
    # The leading partitionable stages stop at the first whole-set stage (dedup compares across records).
    assert leading_partitionable(recipe) == ["generate", "solve", "filter", "difficulty"]
    assert group_stages(recipe) == [("data", recipe[:7]), ("train", ["train"]), ("grpo", ["grpo"]), ("eval", ["eval", "report"])]
    cfg = load_recipe(compose_recipe("demo", ["run.dir=runs/x"]))
    assert get_stage("solve").needs_teacher(cfg) and not get_stage("dedup").needs_teacher(cfg)
    judged = load_recipe(compose_recipe("demo", ["run.dir=runs/x", "data.decontam.llm_judge=true"]))
    assert get_stage("decontam").needs_teacher(judged) and not get_stage("decontam").needs_teacher(cfg)
    with pytest.raises(ConfigError, match="unknown stage 'bake'"):
        get_stage("bake")


NEW_STAGE = '''
from sandlab.stages import Kind, Stage

CALLS = []


def run(ctx, records, offset):
    CALLS.append((offset, [r["id"] for r in records]))
    kept = [r for r in records if len(r["problem"]) % 2 == 0]
    dropped = [{**r, "reason": "odd_length"} for r in records if len(r["problem"]) % 2]
    return kept, dropped


STAGE = Stage("even_length", Kind.DATA, run, per_record=True, partitionable=True, config=("data.shard_size",),
              input_fields=("id", "problem", "reference_answer"), hint="write problems of even length")
'''


@pytest.fixture
def added_stage(tmp_path, monkeypatch):
    """A stage added the documented way: one module, one entry in STAGE_MODULES."""
    (tmp_path / "sandlab_test_even_length.py").write_text(textwrap.dedent(NEW_STAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = list(registry_module.STAGE_MODULES)
    modules.insert(modules.index("sandlab.data_gen.export"), "sandlab_test_even_length")
    monkeypatch.setattr(registry_module, "STAGE_MODULES", tuple(modules))
    registry.cache_clear()
    yield sys.modules.get("sandlab_test_even_length") or __import__("sandlab_test_even_length")
    registry.cache_clear()
    sys.modules.pop("sandlab_test_even_length", None)


def source_problems(path: Path, n: int) -> Path:
    write_jsonl(path, [{"id": f"p{i}", "problem": "x" * (i + 1), "answer": str(i), "reference_answer": str(i)} for i in range(n)])
    return path


def test_an_added_stage_runs_in_a_recipe_alone_and_resumes(tmp_path, added_stage):
    source = source_problems(tmp_path / "source.jsonl", 7)
    overrides = [f"data.generate.source={source}", "stages=[generate,even_length]", "data.shard_size=3", "wandb.mode=disabled"]
    run_dir = tmp_path / "run"
    Pipeline(compose_recipe("tiny", [*overrides, f"run.dir={run_dir}"]), run_dir).run_stages()
    kept = read_jsonl(run_dir / "data" / "even_length.jsonl")
    assert [r["id"] for r in kept] == ["p1", "p3", "p5"]  # problems of length 2, 4, 6
    assert {r["reason"] for r in read_jsonl(run_dir / "data" / "even_length.dropped.jsonl")} == {"odd_length"}
    assert added_stage.CALLS == [(0, ["p0", "p1", "p2"]), (3, ["p3", "p4", "p5"]), (6, ["p6"])]  # shards and their offsets
    row = json.loads((run_dir / "stages" / "even_length.done").read_text())
    assert (row["in"], row["out"], row["dropped"]) == (7, 3, 4)
    assert not list((run_dir / "data").glob("even_length.shards-*"))  # merged, then removed

    # Killed after its first shard: the rerun does only the shards that had not finished.
    (run_dir / "stages" / "even_length.done").unlink()
    (run_dir / "data" / "even_length.jsonl").unlink()
    shard = run_dir / "data" / "even_length.shards-3" / "000000.json"
    shard.parent.mkdir()
    shard.write_text(json.dumps({"kept": [{"id": "p1", "problem": "xx", "from": "the saved shard"}], "dropped": []}))
    added_stage.CALLS.clear()
    Pipeline(compose_recipe("tiny", [*overrides, f"run.dir={run_dir}"]), run_dir).run_stages()
    assert [offset for offset, _ in added_stage.CALLS] == [3, 6]
    assert read_jsonl(run_dir / "data" / "even_length.jsonl")[0]["from"] == "the saved shard"

    # Alone, on a user's file: the same code, written to output=<dir>.
    added_stage.CALLS.clear()
    out = tmp_path / "out"
    cfg = compose_recipe("tiny", [f"run.dir={tmp_path / 'alone'}", "stage=even_length", "data.shard_size=3"])
    row = Pipeline(cfg, tmp_path / "alone").run_single_stage("even_length", str(source), str(out))
    assert [r["id"] for r in read_jsonl(out / "kept.jsonl")] == ["p1", "p3", "p5"]
    assert json.loads((out / "summary.json").read_text())["out"] == row["out"] == 3
    assert [offset for offset, _ in added_stage.CALLS] == [0, 3, 6]


def test_an_added_stage_that_keeps_nothing_stops_with_its_hint(tmp_path, added_stage):
    source = tmp_path / "odd.jsonl"
    write_jsonl(source, [{"id": "p0", "problem": "x", "answer": "1"}])
    run_dir = tmp_path / "run"
    cfg = compose_recipe("tiny", [f"data.generate.source={source}", "stages=[generate,even_length]", "wandb.mode=disabled", f"run.dir={run_dir}"])
    with pytest.raises(EmptyDatasetError, match=r"kept 0 of 1 records \(drop reasons: odd_length: 1\); write problems of even length"):
        Pipeline(cfg, run_dir).run_stages()
    assert not (run_dir / "stages" / "even_length.done").exists()
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"id": "p0", "problem": "x"}])
    with pytest.raises(ConfigError, match=r"stage even_length: record 1 \(id='p0'\) lacks \['reference_answer'\]"):
        Pipeline(compose_recipe("tiny", [f"run.dir={tmp_path / 'r2'}"]), tmp_path / "r2").run_single_stage("even_length", str(bad), str(tmp_path / "o"))
