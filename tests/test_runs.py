"""Run metadata, secret redaction and W&B offline mode (the real wandb library, no account)."""

import json

from omegaconf import OmegaConf

from sandlab.config import WandbConfig
from sandlab.runs import RunDir, redact
from sandlab.tracking import finish_wandb, init_wandb, resolve_mode


def test_redact_hides_secret_values_recursively():
    cfg = {"teacher": {"api_key": "sk-live-123", "api_key_env": "OPENAI_API_KEY"}, "list": [{"hf_token": "hf_abc"}], "lr": 1e-5}
    out = redact(cfg)
    assert out["teacher"]["api_key"] == "***" and out["list"][0]["hf_token"] == "***"
    assert out["teacher"]["api_key_env"] == "OPENAI_API_KEY" and out["lr"] == 1e-5


def test_run_dir_metadata_and_markers(tmp_path):
    run = RunDir(tmp_path / "r")
    run.write_metadata(OmegaConf.create({"recipe": "x", "secret_token": "hunter2", "hydra": {"a": 1}}), argv=["sandlab"])
    text = (run.path / "config.yaml").read_text()
    assert "hunter2" not in text and "hydra" not in text and "recipe: x" in text
    info = json.loads((run.path / "run_info.json").read_text())
    assert set(info) >= {"git_sha", "packages", "argv", "slurm_job_id"} and info["packages"]["torch"]
    assert not run.is_done("train")
    run.mark_done("train", {"steps": 2})
    assert run.is_done("train") and json.loads(run.done_marker("train").read_text()) == {"steps": 2}


def test_wandb_mode_follows_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode(WandbConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(WandbConfig()) == "online"
    assert resolve_mode(WandbConfig(mode="disabled")) == "disabled"


def test_wandb_offline_run_records_recipe_fields_without_secrets(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = WandbConfig(project="sandlab-test", group="demo", tags=["t1"])
    run = init_wandb(cfg, name="run-a", run_dir=str(tmp_path), config={"recipe": "demo", "api_key": "sk-secret"})
    try:
        assert run.settings.mode == "offline" or run.offline
        assert run.name == "run-a" and run.group == "demo" and list(run.tags) == ["t1"]
        assert run.config["api_key"] == "***" and run.config["recipe"] == "demo"
        run.log({"loss": 1.0})
    finally:
        finish_wandb()
    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert files and b"sk-secret" not in files[0].read_bytes()


def test_a_sweep_override_longer_than_a_wandb_tag_still_tracks(tmp_path, monkeypatch):
    """W&B refuses tags over 64 characters; a sweep over a long dataset path must still get its run."""
    import wandb

    from sandlab.tracking import start_tracking

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    long_override = "data.dataset_path=/tmp/" + "d" * 60 + "/train.jsonl"
    sweep = {"dir": str(tmp_path / "sweep"), "num": 0, "overrides": [long_override, "train.trl.learning_rate=1e-4"]}
    start_tracking(WandbConfig(project="sandlab-test"), recipe="tiny", run_dir=tmp_path, root_run_dir=tmp_path, config={},
                   job_type="train", sweep=sweep)
    try:
        assert wandb.run is not None
        tags = list(wandb.run.tags)
        assert "train.trl.learning_rate=1e-4" in tags and all(len(t) <= 64 for t in tags)
        assert any(t.startswith("data.dataset_path=/tmp/ddd") and t.endswith("...") for t in tags)
    finally:
        finish_wandb()
