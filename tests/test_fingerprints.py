"""Stage fingerprints (sandlab.launch.fingerprints) across sandlab versions and damaged run directories:
what an older sandlab wrote is compared as this one would write it, a real change is still refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sandlab.errors import ConfigError
from sandlab.launch.cli import compose_recipe
from sandlab.launch.fingerprints import changed_keys, check_fingerprint, fingerprint_path, stage_config, write_fingerprint
from sandlab.stages import get_stage, load_recipe


def values(name: str, stage: str, *overrides: str) -> dict:
    cfg = compose_recipe(name, ["run.dir=/tmp/x", *overrides])
    return stage_config(cfg, load_recipe(cfg), stage)


def test_a_fingerprint_from_an_older_sandlab_lets_a_finished_stage_be_skipped(tmp_path):
    """Older fingerprints kept server addresses and concurrency, did not mask secrets, and lacked the
    settings added since: none of that is a change. A changed answer rule still is."""
    now = values("tiny", "eval", "stages=[eval]", "eval.backend.backend=openai", "eval.backend.base_urls=[http://node1:8000/v1]", "+eval.backend.extra_body.api_key=s3cret")
    older = {k: v for k, v in now.items() if k != "eval.option_seed"}  # a setting this sandlab added (its default keeps the old behaviour)
    older |= {"eval.backend.base_urls": ["http://node1:8000/v1"], "eval.backend.max_concurrency": 32, "eval.backend.timeout_s": 600.0,
              "eval.backend.extra_body.api_key": "s3cret"}
    assert "eval.option_seed" in now and now["eval.backend.extra_body.api_key"] == "***"
    write_fingerprint(tmp_path, "eval", older)
    check_fingerprint(tmp_path, "eval", now, done=True)  # no error: the stage is skipped
    rule = values("tiny", "eval", "stages=[eval]", "eval.backend.backend=openai", "eval.backend.base_urls=[http://node1:8000/v1]", "eval.answer_rule=last_box")
    with pytest.raises(ConfigError, match=r"stage eval already ran .* \(eval.answer_rule: 'multi' -> 'last_box'"):
        check_fingerprint(tmp_path, "eval", rule, done=True)


def test_a_key_on_one_side_is_a_change_only_when_the_other_side_has_its_section():
    before = {"a.b": 1, "gone": 5, "x": None, "y.z": 2}
    now = {"a.b": 1, "added": 7, "x.k": 3, "y": None}
    assert changed_keys(before, now) == ["x", "x.k", "y", "y.z"]
    assert changed_keys({"a.b": 1}, {"a.b": 2, "a.c": 1}) == ["a.b"]


def test_memory_plan_hints_are_not_settings_of_the_score_stage():
    """architecture and num_params_b only size the memory plan: changing them does not refuse a resume;
    the reward model itself does."""
    base = values("am_general_distill", "score")
    assert any(k.startswith("data.score.reward_model.") for k in base)
    assert not any(".architecture" in k or k.endswith("num_params_b") for k in base)
    hinted = values("am_general_distill", "score", "data.score.reward_model.architecture.hidden_size=1", "data.score.reward_model.num_params_b=1")
    assert changed_keys(base, hinted) == []
    other = values("am_general_distill", "score", "data.score.reward_model.model=/models/other")
    assert changed_keys(base, other) == ["data.score.reward_model.model"]


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]"])
def test_a_damaged_fingerprint_is_one_line_naming_the_file(tmp_path, text):
    path = fingerprint_path(tmp_path, "solve")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        check_fingerprint(tmp_path, "solve", {"data.solve.k": 4}, done=False)
    assert str(info.value).startswith(f"{path} is not a stage fingerprint") and "remove it" in str(info.value) and "\n" not in str(info.value)


def test_only_directories_with_a_finished_file_are_saved_results(tmp_path):
    """A kill between creating a shard directory and renaming its first shard into place leaves it
    empty, or with a hidden temporary file: nothing a resume reuses, so new settings may start over."""
    data = tmp_path / "data"
    (data / "solve.shards-8").mkdir(parents=True)
    (data / "solve.rounds").mkdir()
    (data / "solve.rounds" / ".000000.json.tmp-123").write_text("{")
    ctx = SimpleNamespace(data_dir=data)
    solve = get_stage("solve")
    assert solve.saved_results(ctx) == []
    write_fingerprint(tmp_path, "solve", {"data.solve.k": 4})
    check_fingerprint(tmp_path, "solve", {"data.solve.k": 8}, done=False, saved=solve.saved_results(ctx))  # starts over
    (data / "solve.shards-8" / "000000.json").write_text("{}")
    assert solve.saved_results(ctx) == [data / "solve.shards-8"]
    with pytest.raises(ConfigError, match=r"stage solve started in .* \(data.solve.k: 4 -> 8\).* remove .*solve.shards-8 to start it over"):
        check_fingerprint(tmp_path, "solve", {"data.solve.k": 8}, done=False, saved=solve.saved_results(ctx))


def test_fingerprints_written_by_the_pipeline_hold_no_secret(tmp_path):
    now = values("tiny", "eval", "stages=[eval]", "eval.backend.backend=openai", "eval.backend.base_urls=[http://node1:8000/v1]", "+eval.backend.extra_body.headers.Authorization=Bearer-s3cret")
    write_fingerprint(tmp_path, "eval", now)
    text = fingerprint_path(tmp_path, "eval").read_text()
    assert "s3cret" not in text and json.loads(text)["eval.backend.extra_body.headers.Authorization"] == "***"
