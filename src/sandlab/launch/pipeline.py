"""Runs a recipe's stages in order inside one run directory; finished stages are skipped on rerun.

generate -> solve -> filter -> dedup -> export   (data_gen, teacher backend)
train                                            (TRL SFT of the student)
eval -> report                                   (own harness + shared grader)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sandlab.config import RecipeConfig, validate_recipe
from sandlab.errors import ConfigError, EmptyDatasetError, SandlabError
from sandlab.records import Record, read_jsonl, write_json, write_jsonl
from sandlab.reporting import funnel_row, plot_funnel, print_results, write_results
from sandlab.runs import RunDir, repo_root

log = logging.getLogger("sandlab")
DATA_STAGES = ("generate", "solve", "filter", "dedup", "export")


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

    def _finish_data_stage(self, stage: str, n_in: int, kept: list[Record], dropped: list[Record], hint: str) -> None:
        row = funnel_row(stage, n_in, kept, dropped)
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

    # ---- stages ------------------------------------------------------------------------------
    def stage_generate(self) -> None:
        from sandlab.data_gen.generate import build_requests, generate_problems  # noqa: PLC0415

        gen = self.cfg.data.generate
        requests = build_requests(gen, self.root, self.cfg.run.seed)
        kept, dropped = generate_problems(self.teacher, requests, gen, teacher=self.cfg.teacher.model)
        self._finish_data_stage("generate", len(requests), kept, dropped, "raise data.generate.num_problems or use a stronger teacher")

    def stage_solve(self) -> None:
        from sandlab.data_gen.solve import solve_problems  # noqa: PLC0415

        problems = self._records("generate")
        solved = solve_problems(self.teacher, problems, self.cfg.data.solve, self.root)
        self._finish_data_stage("solve", len(problems), solved, [], "")

    def stage_filter(self) -> None:
        from sandlab.data_gen.agreement import filter_by_agreement  # noqa: PLC0415

        solved = self._records("solve")
        kept, dropped = filter_by_agreement(solved, self.cfg.data.agreement, self.pool, include_reference=self.cfg.data.solve.include_reference)
        self._finish_data_stage("filter", len(solved), kept, dropped, "raise data.generate.num_problems or lower data.agreement.min_agreement")

    def stage_dedup(self) -> None:
        from sandlab.data_gen.dedup import dedup  # noqa: PLC0415

        records = self._records("filter")
        kept, dropped = dedup(records, self.cfg.data.dedup)
        self._finish_data_stage("dedup", len(records), kept, dropped, "raise data.dedup.threshold")

    def stage_export(self) -> None:
        from sandlab.data_gen.export import export_sft  # noqa: PLC0415

        records = self._records("dedup")
        kept, dropped = export_sft(records, self.cfg.data.export)
        if kept:  # the dataset lands before the stage is marked done
            write_jsonl(self.run.sub("sft") / "train.jsonl", kept)
        self._finish_data_stage("export", len(records), kept, dropped, "lower data.export.min_words")

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
        if funnel:
            wandb.log({"funnel": wandb.Table(columns=["stage", "in", "out", "dropped"], data=[[r["stage"], r["in"], r["out"], r["dropped"]] for r in funnel])})
            if (self.run.path / "funnel.png").exists():
                wandb.log({"funnel_plot": wandb.Image(str(self.run.path / "funnel.png"))})

    # ---- driver ------------------------------------------------------------------------------
    def preflight(self, selected: list[str]) -> None:
        """Fail in seconds, not after a model load: paths exist, servers answer, datasets are there."""
        from sandlab.models import resolve_model_path  # noqa: PLC0415

        if any(s in DATA_STAGES for s in selected):
            if self.cfg.teacher.backend == "openai":
                self.teacher.check_health()
            else:
                resolve_model_path(self.cfg.teacher.model, what="teacher.model")
        if "train" in selected or ("eval" in selected and "base" in self.cfg.eval.models):
            resolve_model_path(self.cfg.model.path, what="model.path")
        if self.cfg.data.dataset_path and "train" in selected:
            path = self.cfg.data.dataset_path
            if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
                raise EmptyDatasetError(f"data.dataset_path={path!r} does not exist; give a JSONL file/dir or a Hub dataset id")
        template = self._path(self.cfg.model.chat_template)
        if template and not Path(template).is_file():
            raise ConfigError(f"model.chat_template={self.cfg.model.chat_template!r} is not a file")
        if "eval" in selected:
            from sandlab.benchmarks import load_benchmark  # noqa: PLC0415

            for name in self.cfg.eval.benchmarks:
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
                getattr(self, f"stage_{stage}")()
        finally:
            self.close()
            finish_wandb()
