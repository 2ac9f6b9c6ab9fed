"""Runs a recipe's stages in order inside one run directory; finished stages are skipped on rerun.

generate -> solve -> filter -> dedup -> decontam -> export   (data stages, teacher backend)
train / grpo                                                (TRL SFT / GRPO of the student)
eval -> report                                              (own harness + shared grader)

What each stage is and needs comes from its declaration (``sandlab.stages``); this module only orders
the stages, hands each its input and records what finished.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sandlab.errors import ConfigError, EmptyDatasetError
from sandlab.launch import data_stages, fingerprints, partitions
from sandlab.launch.preflight import preflight
from sandlab.readers import read_stage_input
from sandlab.records import Record, write_json
from sandlab.runs import RunDir, repo_root
from sandlab.stages import Kind, Stage, StageContext, get_stage, is_data_stage, load_recipe, stage_names
from sandlab.train.launcher import is_main_process

log = logging.getLogger("sandlab")


class Pipeline:
    def __init__(self, cfg: DictConfig, run_dir: str | Path, sweep: dict[str, Any] | None = None):
        self.raw_cfg = cfg
        self.sweep = sweep  # {"dir", "num", "overrides"} when this process is one point of a Hydra multirun
        self.cfg = load_recipe(cfg)
        self.root = repo_root()
        self.root_run = self.run = RunDir(run_dir)
        part = self.cfg.data.partition
        self.partition_worker = part.count > 1 and part.index is not None
        if self.partition_worker:  # one array task: its own directory inside the run
            self.run = RunDir(partitions.partition_dir(self.root_run.path, part.index, part.count))
        self.ctx = StageContext(self.cfg, self.root, self.run, partition_worker=self.partition_worker)
        self._requests: list[Record] | None = None

    # ---- stage state ---------------------------------------------------------------------------
    def stage_config(self, stage: str) -> dict[str, Any]:
        return fingerprints.stage_config(self.raw_cfg, self.cfg, stage)

    def check_stage_config(self, stage: str, run: RunDir | None = None) -> None:
        run = run or self.run
        saved = get_stage(stage).saved_results(self.ctx) if run is self.run else []
        fingerprints.check_fingerprint(run.path, stage, self.stage_config(stage), done=run.is_done(stage), saved=saved)

    def mark_started(self, stage: str) -> None:
        # Written before the stage saves anything: a resume with other settings would mix them.
        fingerprints.write_fingerprint(self.run.path, stage, self.stage_config(stage))

    def mark_done(self, stage: str, summary: dict[str, Any]) -> None:
        fingerprints.write_fingerprint(self.run.path, stage, self.stage_config(stage))
        self.run.mark_done(stage, summary)

    # ---- data stages -----------------------------------------------------------------------------
    def _first_inputs(self, stage: Stage) -> tuple[list[Record], int]:
        """A first stage's own input (all of it, or this partition's slice) and its global offset."""
        if self._requests is None:
            self._requests = stage.make_inputs(self.ctx)
        if not self.partition_worker:
            return self._requests, 0
        lo, hi = partitions.partition_slice(len(self._requests), self.cfg.data.partition.index, self.cfg.data.partition.count)
        return self._requests[lo:hi], lo  # partitions never share sampling seeds

    def _stage_inputs(self, stage: Stage) -> tuple[list[Record], int]:
        if stage.make_inputs is not None:
            return self._first_inputs(stage)
        enabled = [s for s in self.cfg.stages if is_data_stage(s)]
        if enabled.index(stage.name) == 0:
            return [], 0
        previous = enabled[enabled.index(stage.name) - 1]
        if not (self.ctx.data_dir / f"{previous}.jsonl").exists():
            raise EmptyDatasetError(f"stage {stage.name} reads the output of stage {previous}, which has not run in {self.run.path}; run it first")
        # A partition's records sit at its slice of the first stage's input: seeds follow that position.
        first = get_stage(enabled[0])
        offset = self._first_inputs(first)[1] if self.partition_worker and stage.per_record and first.make_inputs else 0
        return self.ctx.records(previous), offset

    def _run_data_stage(self, stage: Stage) -> None:
        records, offset = self._stage_inputs(stage)
        kept, dropped, row = data_stages.apply_stage(self.ctx, stage, records, offset=offset)
        data_stages.write_stage_records(self.ctx.data_dir, stage, kept, dropped, row, allow_empty=self.partition_worker)
        self.mark_done(stage.name, row)
        data_stages.remove_shards(self.ctx, stage.name)

    def _merge_partitions(self, stage: Stage) -> None:
        runs, n_in, kept, dropped, seconds = partitions.collect_partitions(self.cfg, self.root_run.path, stage.name)
        for run in runs:
            self.check_stage_config(stage.name, run)
        from sandlab.reporting import funnel_row  # noqa: PLC0415

        row = funnel_row(stage.name, n_in, kept, dropped, seconds)
        data_stages.write_stage_records(self.ctx.data_dir, stage, kept, dropped, row)
        self.mark_done(stage.name, row)

    def run_single_stage(self, name: str, input_path: str | None, output_dir: str | None) -> dict[str, Any]:
        """Apply one data stage to a JSONL file of records (``id``, ``problem``, ...): for users who
        want one filter on a dataset they already have. Writes kept.jsonl, dropped.jsonl, summary.json, and
        stages/<stage>.config.json (the settings and the input's digest a killed run may resume with)."""
        if not is_data_stage(name):
            raise ConfigError(f"stage={name!r} cannot run alone; choose from {[s for s in stage_names(Kind.DATA)]}")
        stage = get_stage(name)
        if not output_dir:
            raise ConfigError(f"stage={name} needs output=<dir> for kept.jsonl and dropped.jsonl")
        out = Path(output_dir)
        self.ctx = StageContext(self.cfg, self.root, self.run, data_dir=out)
        self.ctx.selected = [name]
        preflight(self.ctx, [name])
        self.run.write_metadata(self.raw_cfg)
        if stage.make_inputs is not None:
            records = stage.make_inputs(self.ctx)
        else:
            if not input_path or not Path(input_path).is_file():
                raise ConfigError(f"stage={name} needs input=<file.jsonl> with one record per line (got {input_path!r})")
            try:  # sandlab records as they are; any other dataset format through the readers (data.format)
                records = read_stage_input(input_path, self.cfg.data.format)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ConfigError(f"input={input_path} is not valid JSONL ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        out.mkdir(parents=True, exist_ok=True)
        # A killed standalone run resumes from its shards in output=: only with the settings and the input that made them.
        values = {**fingerprints.stage_config(self.raw_cfg, self.cfg, name, alone=True), "input.sha256": fingerprints.records_digest(records)}
        fingerprints.check_fingerprint(out, name, values, done=False, saved=stage.saved_results(self.ctx), elsewhere="a new output=")
        fingerprints.write_fingerprint(out, name, values)
        try:
            kept, dropped, row = data_stages.apply_stage(self.ctx, stage, records)
        finally:
            self.ctx.close()
        data_stages.write_standalone(out, kept, dropped, row)
        data_stages.remove_shards(self.ctx, name)
        log.info("%s: -> %s", name, out)
        return row

    # ---- driver ------------------------------------------------------------------------------
    def select(self, stages: list[str] | None) -> tuple[list[str], list[str]]:
        """The stages this process runs, and those among them it merges from partitions."""
        cfg = self.cfg
        selected = [s for s in cfg.stages if (stages is None or s in stages) and (not cfg.run.only or s in cfg.run.only)]
        if cfg.data.dataset_path:
            selected = [s for s in selected if not is_data_stage(s)]
        if cfg.data.partition.count <= 1:
            return selected, []
        prefix = partitions.leading_partitionable(cfg.stages)
        if not self.partition_worker:
            return selected, [s for s in selected if s in prefix]
        selected = [s for s in selected if s in prefix]
        if not selected:
            raise ConfigError("data.partition.index is set, but none of the selected stages is one a partition runs "
                              f"({[s for s in stage_names() if get_stage(s).partitionable]} leading the recipe's data stages)")
        return selected, []

    def run_stages(self, stages: list[str] | None = None) -> None:
        from sandlab.tracking import finish_wandb  # noqa: PLC0415

        selected, merged = self.select(stages)
        for stage in selected:
            if get_stage(stage).kind is not Kind.REPORT:
                self.check_stage_config(stage)
        self.ctx.selected = selected
        memory = preflight(self.ctx, [s for s in selected if s not in merged])
        main = is_main_process()  # under `accelerate launch`, only rank 0 records the run
        if main:
            self.run.write_metadata(self.raw_cfg, stages=selected, jobs_log=self.root_run.path / "jobs.jsonl")
            if memory is not None:
                write_json(self.run.path / "memory_plan.json", memory.to_dict())
                log.info("%s", memory.format())
        if main and self.cfg.wandb.mode != "disabled":
            self._start_tracking(selected)
            if memory is not None:
                from sandlab.tracking import log_memory_plan  # noqa: PLC0415

                log_memory_plan(memory.to_dict())
        try:
            for name in selected:
                stage = get_stage(name)
                if stage.kind is not Kind.REPORT and self.run.is_done(name):
                    log.info("%s: already done in %s, skipping", name, self.run.path)
                    continue
                log.info("stage %s", name)
                if main and stage.kind is not Kind.REPORT:
                    self.mark_started(name)
                if name in merged:
                    self._merge_partitions(stage)
                elif stage.kind is Kind.DATA:
                    self._run_data_stage(stage)
                else:
                    summary = stage.run(self.ctx)
                    if summary is not None and stage.kind is not Kind.REPORT:
                        self.mark_done(name, summary)
                if main:
                    self._log_artifacts(name)
        finally:
            self.ctx.close()
            finish_wandb()

    # ---- tracking ----------------------------------------------------------------------------
    def job_type(self, selected: list[str]) -> str:
        if self.cfg.wandb.job_type:
            return self.cfg.wandb.job_type
        kinds = list(dict.fromkeys(get_stage(s).job for s in selected if get_stage(s).kind is not Kind.REPORT)) or ["eval"]
        return kinds[0] if len(kinds) == 1 else "pipeline"

    def _start_tracking(self, selected: list[str]) -> None:
        from sandlab.runs import git_sha, slurm_info  # noqa: PLC0415
        from sandlab.tracking import start_tracking  # noqa: PLC0415

        config = OmegaConf.to_container(self.raw_cfg, resolve=True)
        config.pop("hydra", None)
        config.update(git_sha=git_sha(), run_dir=str(self.root_run.path), slurm=slurm_info(), stages_run=selected,
                      sweep={k: v for k, v in self.sweep.items() if k != "dir"} if self.sweep else None)
        start_tracking(self.cfg.wandb, recipe=self.cfg.recipe, run_dir=self.run.path, root_run_dir=self.root_run.path, config=config,
                       job_type=self.job_type(selected), sweep=self.sweep,
                       partition_index=self.cfg.data.partition.index if self.partition_worker else None)

    def _log_artifacts(self, stage: str) -> None:
        from sandlab.tracking import log_stage_artifacts  # noqa: PLC0415

        log_stage_artifacts(stage, self.cfg.recipe, self.run.path, description=self.cfg.description,
                            funnel=self.ctx.funnel() if stage == "export" else None)
