"""Runs a recipe's stages in order inside one run directory; finished stages are skipped on rerun.

generate -> solve -> filter -> dedup -> decontam -> export   (data_gen, teacher backend)
train                                                       (TRL SFT of the student)
eval -> report                                              (own harness + shared grader)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sandlab.config import DATA_STAGES, RecipeConfig, validate_recipe
from sandlab.errors import ConfigError, EmptyDatasetError, SandlabError
from sandlab.records import Record, read_jsonl, write_json, write_jsonl
from sandlab.reporting import funnel_row, plot_distributions, plot_funnel, print_results, throughput, write_results
from sandlab.runs import RunDir, repo_root

log = logging.getLogger("sandlab")
SHARDED_STAGES = ("generate", "solve", "filter", "difficulty", "export")  # record by record; the rest are global
STAGE_HINTS = {
    "generate": "raise data.generate.num_problems or use a stronger teacher",
    "solve": "check the teacher",
    "filter": "raise data.generate.num_problems or lower data.agreement.min_agreement",
    "dedup": "raise data.dedup.threshold",
    "decontam": "check data.decontam thresholds; everything matched a test benchmark",
    "difficulty": "widen data.difficulty.min_difficulty/max_difficulty",
    "hike": "check the teacher",
    "passrate": "widen data.passrate.min_pass_rate/max_pass_rate",
    "novelty": "raise data.novelty.threshold",
    "export": "lower data.export.min_words",
}


def require_fields(records: list[Record], stage: str, fields: list[str], hint: str) -> None:
    for i, rec in enumerate(records):
        missing = [f for f in fields if f not in rec]
        if missing:
            raise ConfigError(f"stage {stage}: record {i + 1} (id={rec.get('id')!r}) lacks {missing}; {hint}")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Pipeline:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.raw_cfg = cfg
        self.cfg: RecipeConfig = validate_recipe(cfg)
        self.root = repo_root()
        self.run = RunDir(run_dir)
        self.data_dir = self.run.sub("data")
        self._teacher = None
        self._pool = None

    # ---- shared services, created on first use -------------------------------------------------
    @property
    def teacher(self):
        if self._teacher is None:
            from sandlab.inference import build_backend  # noqa: PLC0415

            self._teacher = build_backend(self.cfg.teacher)
        return self._teacher

    @property
    def pool(self):
        if self._pool is None:
            from sandlab.grading import GradingPool  # noqa: PLC0415

            self._pool = GradingPool(timeout_s=self.cfg.eval.grading_timeout_s)
        return self._pool

    def close(self) -> None:
        if self._teacher is not None:
            self._teacher.close()
            self._teacher = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # ---- bookkeeping -------------------------------------------------------------------------
    def _records(self, stage: str) -> list[Record]:
        return read_jsonl(self.data_dir / f"{stage}.jsonl")

    def _finish_data_stage(self, stage: str, n_in: int, kept: list[Record], dropped: list[Record], hint: str, seconds: float | None = None) -> None:
        row = funnel_row(stage, n_in, kept, dropped, seconds)
        log.info("%s: %d in, %d kept, %d dropped %s", stage, n_in, len(kept), len(dropped), row["reasons"])
        # Dropped records are written even when the stage fails: they say why everything was dropped.
        write_jsonl(self.data_dir / f"{stage}.dropped.jsonl", dropped)
        if not kept:
            reasons = ", ".join(f"{k}: {v}" for k, v in row["reasons"].items()) or "none"
            raise EmptyDatasetError(f"stage '{stage}' kept 0 of {n_in} records (drop reasons: {reasons}); {hint}")
        write_jsonl(self.data_dir / f"{stage}.jsonl", kept)
        self.run.mark_done(stage, row)

    def funnel(self) -> list[dict[str, Any]]:
        markers = [self.run.done_marker(stage) for stage in DATA_STAGES]
        return [json.loads(m.read_text()) for m in markers if m.exists()]

    # ---- data stages: records in -> (kept, dropped) ------------------------------------------
    # ``offset`` is the position of the first record in the stage's input: sampling seeds follow the
    # record's position, so a sharded or resumed run samples exactly what an uninterrupted one does.
    def data_generate(self, requests: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.generate import generate_problems  # noqa: PLC0415

        if self.cfg.data.generate.source:  # distillation mode: the problems exist already
            return requests, []
        return generate_problems(self.teacher, requests, self.cfg.data.generate, teacher=self.cfg.teacher.model, seed_offset=offset)

    def data_solve(self, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.solve import solve_problems  # noqa: PLC0415

        return solve_problems(self.teacher, records, self.cfg.data.solve, self.root, seed_offset=offset), []

    def data_filter(self, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.agreement import filter_by_agreement  # noqa: PLC0415

        require_fields(records, "filter", ["solutions"], "run stage=solve on them first")
        if self.cfg.data.agreement.mode == "reference":
            from sandlab.data_gen.agreement import filter_by_reference  # noqa: PLC0415

            require_fields(records, "filter", ["reference_answer"], "data.agreement.mode=reference needs problems with reference answers")
            return filter_by_reference(records, self.cfg.data.agreement, self.pool)
        return filter_by_agreement(records, self.cfg.data.agreement, self.pool, include_reference=self.cfg.data.solve.include_reference)

    def data_dedup(self, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.dedup import dedup  # noqa: PLC0415

        return dedup(records, self.cfg.data.dedup)

    def data_decontam(self, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.decontam import decontaminate  # noqa: PLC0415

        kept, dropped, report = decontaminate(records, self.cfg.data.decontam, judge=self.teacher if self.cfg.data.decontam.llm_judge else None)
        write_json(self.data_dir / "decontamination_report.json", report)
        return kept, dropped

    def data_difficulty(self, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.filters import rate_difficulty  # noqa: PLC0415

        return rate_difficulty(self.teacher, records, self.cfg.data.difficulty, self.root, seed_offset=offset)

    def data_hike(self, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.hike import hike_problems  # noqa: PLC0415

        d = self.cfg.data
        return hike_problems(self.teacher, self.pool, records, d.hike, d.solve, d.agreement, self.root, seed=self.cfg.run.seed, teacher=self.cfg.teacher.model)

    def data_passrate(self, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.filters import filter_by_pass_rate  # noqa: PLC0415
        from sandlab.inference import build_backend  # noqa: PLC0415

        require_fields(records, "passrate", ["answer"], "run the solve and filter stages first")
        with build_backend(self.cfg.data.passrate.student) as student:
            return filter_by_pass_rate(student, self.pool, records, self.cfg.data.passrate, self.root, seed_offset=offset)

    def data_novelty(self, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.filters import filter_novelty  # noqa: PLC0415

        return filter_novelty(records, self.cfg.data.novelty)

    def data_export(self, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
        from sandlab.data_gen.export import export_sft  # noqa: PLC0415

        require_fields(records, "export", ["solution", "answer"], "run the solve and filter stages first")
        return export_sft(records, self.cfg.data.export)

    def _stage_inputs(self, stage: str) -> list[Record]:
        if stage == "generate":
            from sandlab.data_gen.generate import build_requests, load_source_problems  # noqa: PLC0415

            if self.cfg.data.generate.source:
                return load_source_problems(self.cfg.data.generate)
            return build_requests(self.cfg.data.generate, self.root, self.cfg.run.seed)
        enabled = [s for s in self.cfg.stages if s in DATA_STAGES]
        previous = enabled[enabled.index(stage) - 1] if enabled.index(stage) > 0 else None
        if previous is None:
            return []
        if not (self.data_dir / f"{previous}.jsonl").exists():
            raise EmptyDatasetError(f"stage {stage} reads the output of stage {previous}, which has not run in {self.run.path}; run it first")
        return self._records(previous)

    def _apply_sharded(self, stage: str, records: list[Record]) -> tuple[list[Record], list[Record]]:
        """Per-record stages run shard by shard; each finished shard is saved atomically, so a killed
        stage resumes at the first unfinished shard and never redoes or duplicates finished work."""
        size = self.cfg.data.shard_size
        fn = getattr(self, f"data_{stage}")
        if stage not in SHARDED_STAGES or size <= 0 or len(records) <= size:
            return fn(records)
        shard_dir = self.data_dir / f"{stage}.shards-{size}"
        kept: list[Record] = []
        dropped: list[Record] = []
        for start in range(0, len(records), size):
            path = shard_dir / f"{start // size:06d}.json"
            if path.exists():
                done = json.loads(path.read_text())
            else:
                k, d = fn(records[start : start + size], offset=start)
                done = {"kept": k, "dropped": d}
                write_json(path, done)
            kept += done["kept"]
            dropped += done["dropped"]
        return kept, dropped

    def _run_data_stage(self, stage: str) -> None:
        start = time.monotonic()
        records = self._stage_inputs(stage)
        kept, dropped = self._apply_sharded(stage, records)
        if stage == "export" and kept:  # the dataset lands before the stage is marked done
            write_jsonl(self.run.sub("sft") / "train.jsonl", kept)
        self._finish_data_stage(stage, len(records), kept, dropped, STAGE_HINTS[stage], seconds=time.monotonic() - start)
        for shards in self.data_dir.glob(f"{stage}.shards-*"):  # merged into <stage>.jsonl now
            shutil.rmtree(shards, ignore_errors=True)

    def run_single_stage(self, stage: str, input_path: str | None, output_dir: str | None) -> dict[str, Any]:
        """Apply one data stage to a JSONL file of records (``id``, ``problem``, ...): for users who
        want one filter on a dataset they already have. Writes kept.jsonl, dropped.jsonl, summary.json."""
        if stage not in DATA_STAGES:
            raise ConfigError(f"stage={stage!r} cannot run alone; choose from {list(DATA_STAGES)}")
        if not output_dir:
            raise ConfigError(f"stage={stage} needs output=<dir> for kept.jsonl and dropped.jsonl")
        self.preflight([stage])
        self.run.write_metadata(self.raw_cfg)
        records: list[Record] = self._stage_inputs("generate") if stage == "generate" else []
        if stage != "generate":
            if not input_path or not Path(input_path).is_file():
                raise ConfigError(f"stage={stage} needs input=<file.jsonl> with one record per line (got {input_path!r})")
            try:
                records = read_jsonl(input_path)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ConfigError(f"input={input_path} is not valid JSONL ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
            require_fields(records, stage, ["id", "problem"], "every record needs a stable id and a problem")
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        try:
            kept, dropped = getattr(self, f"data_{stage}")(records)
        finally:
            self.close()
        if stage == "decontam" and (self.data_dir / "decontamination_report.json").exists():
            (self.data_dir / "decontamination_report.json").replace(out / "decontamination_report.json")
        row = funnel_row(stage, len(records), kept, dropped)
        write_jsonl(out / "dropped.jsonl", dropped)
        write_jsonl(out / "kept.jsonl", kept)
        write_json(out / "summary.json", row)
        log.info("%s: %d in, %d kept, %d dropped %s -> %s", stage, row["in"], row["out"], row["dropped"], row["reasons"], out)
        return row

    def _path(self, value: str | None) -> str | None:
        """Recipe paths are relative to the repository root."""
        if not value:
            return None
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else self.root / path)

    def sft_dataset(self) -> str:
        return self.cfg.data.dataset_path or str(self.run.path / "sft" / "train.jsonl")

    def tuned_dir(self) -> Path:
        return self.run.path / "checkpoints" / "final"

    def stage_train(self) -> None:
        from sandlab.models import resolve_model_path  # noqa: PLC0415

        self.close()  # free the teacher engine's memory before training
        t = self.cfg.train
        model_path = resolve_model_path(self.cfg.model.path)
        dataset = self.sft_dataset()
        if not Path(dataset).exists() and not self.cfg.data.dataset_path:
            raise EmptyDatasetError(f"no SFT dataset at {dataset}; run the data stages first or set data.dataset_path")
        if t.num_processes > 1 and "WORLD_SIZE" not in os.environ:
            self._launch_distributed_training()
        else:
            from sandlab.train.sft import run_sft  # noqa: PLC0415

            run_sft(model_path, dataset, t, output_dir=str(self.tuned_dir()), run_name=f"{self.cfg.recipe}-sft",
                    seed=self.cfg.run.seed, report_to=["wandb"] if self.cfg.wandb.mode != "disabled" else [],
                    chat_template_path=self._path(self.cfg.model.chat_template))
        if not is_main_process():
            return
        self.run.mark_done("train", {"model": model_path, "dataset": dataset, "output": str(self.tuned_dir())})

    def _launch_distributed_training(self) -> None:
        """Multi-process training goes through ``accelerate launch train/sft.py`` with the same recipe."""
        t = self.cfg.train
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(self.root / t.accelerate_config),
            "--num_processes", str(t.num_processes), str(self.root / "train" / "sft.py"),
            "--config-dir", str(self.run.path), "--config-name", "config", f"run.dir={self.run.path}", f"hydra.run.dir={self.run.path}",
        ]
        log.info("launching: %s", " ".join(cmd))
        result = subprocess.run(cmd, check=False)
        if result.returncode != 0:
            raise SandlabError(f"distributed training exited with code {result.returncode}; see the log above, then rerun with run.dir={self.run.path} to resume")

    def stage_eval(self) -> None:
        from sandlab.eval.harness import evaluate_benchmark  # noqa: PLC0415
        from sandlab.inference import build_backend  # noqa: PLC0415

        self.close()
        results = {}
        for name in self.cfg.eval.models:
            model = {"base": self.cfg.model.path, "tuned": str(self.tuned_dir())}.get(name, name)
            # The base model is rendered with the recipe's template; a tuned checkpoint carries its own.
            template = self._path(self.cfg.model.chat_template) if name == "base" else None
            backend_cfg = dataclasses.replace(self.cfg.eval.backend, model=model, chat_template=template or self.cfg.eval.backend.chat_template)
            out = self.run.sub("eval", name.replace("/", "__"))
            with build_backend(backend_cfg) as backend:
                results[name] = {b: evaluate_benchmark(backend, self.pool, b, self.cfg.eval, out / b) for b in self.cfg.eval.benchmarks}
        write_json(self.run.path / "eval" / "results.json", results)
        self.run.mark_done("eval", {"models": list(results)})

    def stage_report(self) -> None:
        funnel = self.funnel()
        results_path = self.run.path / "eval" / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        if funnel:
            plot_funnel(funnel, self.run.path / "funnel.png")
        final = self.data_dir / "export.jsonl"
        if final.exists():
            rated = {r["id"]: r.get("difficulty") for r in read_jsonl(self.data_dir / "difficulty.jsonl")} if (self.data_dir / "difficulty.jsonl").exists() else {}
            rows = [{**r, "difficulty": rated.get(r["id"])} for r in read_jsonl(final)]
            plot_distributions(rows, self.run.path / "distributions.png")
        write_results(results, funnel, self.run.path, title=f"sandlab run: {self.cfg.recipe}")
        print_results(results, funnel)
        self._log_to_wandb(results, funnel)
        log.info("report: %s", self.run.path / "report.md")

    def _log_to_wandb(self, results: dict, funnel: list) -> None:
        import wandb  # noqa: PLC0415

        if wandb.run is None:
            return
        for model, per_bench in results.items():
            for bench, metrics in per_bench.items():
                wandb.run.summary[f"eval/{model}/{bench}/pass@1"] = metrics["pass@1"]
        for key, value in (throughput(funnel) or {}).items():
            wandb.run.summary[f"data/{key}"] = value
        if funnel:
            wandb.log({"funnel": wandb.Table(columns=["stage", "in", "out", "dropped"], data=[[r["stage"], r["in"], r["out"], r["dropped"]] for r in funnel])})
            for plot in ("funnel", "distributions"):
                if (self.run.path / f"{plot}.png").exists():
                    wandb.log({f"{plot}_plot": wandb.Image(str(self.run.path / f"{plot}.png"))})

    # ---- driver ------------------------------------------------------------------------------
    def preflight(self, selected: list[str]) -> None:
        """Fail in seconds, not after a model load: paths exist, servers answer, datasets are there."""
        from sandlab.models import looks_like_local_path, resolve_model_path  # noqa: PLC0415

        needs_teacher = any(s in ("generate", "solve", "difficulty", "hike") for s in selected) or ("decontam" in selected and self.cfg.data.decontam.llm_judge)
        if needs_teacher:
            if self.cfg.teacher.backend == "openai":
                self.teacher.check_health()
            else:
                resolve_model_path(self.cfg.teacher.model, what="teacher.model")
        if "train" in selected or ("eval" in selected and "base" in self.cfg.eval.models):
            resolve_model_path(self.cfg.model.path, what="model.path")
        if self.cfg.data.dataset_path and "train" in selected:
            path = self.cfg.data.dataset_path
            if not Path(path).exists() and looks_like_local_path(path):
                raise EmptyDatasetError(f"data.dataset_path={path!r} does not exist; give a JSONL file/dir or a Hub dataset id")
        template = self._path(self.cfg.model.chat_template)
        if template and not Path(template).is_file():
            raise ConfigError(f"model.chat_template={self.cfg.model.chat_template!r} is not a file")
        from sandlab.benchmarks import load_benchmark  # noqa: PLC0415

        needed = (self.cfg.eval.benchmarks if "eval" in selected else []) + (self.cfg.data.decontam.benchmarks if "decontam" in selected else [])
        for name in dict.fromkeys(needed):
            load_benchmark(name, limit=1)
        if "eval" in selected and "tuned" in self.cfg.eval.models and "train" not in selected and not self.tuned_dir().exists():
            raise EmptyDatasetError(f"eval.models has 'tuned' but {self.tuned_dir()} does not exist; train first or set run.dir to a trained run")

    def run_stages(self, stages: list[str] | None = None) -> None:
        from sandlab.tracking import finish_wandb, init_wandb  # noqa: PLC0415

        selected = [s for s in self.cfg.stages if stages is None or s in stages]
        if self.cfg.data.dataset_path:
            selected = [s for s in selected if s not in DATA_STAGES]
        self.preflight(selected)
        main = is_main_process()  # under `accelerate launch`, only rank 0 records the run
        if main:
            self.run.write_metadata(self.raw_cfg)
        if main and self.cfg.wandb.mode != "disabled":
            init_wandb(self.cfg.wandb, name=self.cfg.wandb.name or f"{self.cfg.recipe}-{self.run.path.name}", run_dir=str(self.run.path),
                       config=OmegaConf.to_container(self.raw_cfg, resolve=True))
        try:
            for stage in selected:
                if stage != "report" and self.run.is_done(stage):
                    log.info("%s: already done in %s, skipping", stage, self.run.path)
                    continue
                log.info("stage %s", stage)
                if stage in DATA_STAGES:
                    self._run_data_stage(stage)
                else:
                    getattr(self, f"stage_{stage}")()
        finally:
            self.close()
            finish_wandb()
