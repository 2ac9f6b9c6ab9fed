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

from sandlab.config import DATA_STAGES, RecipeConfig, stage_kind, validate_recipe
from sandlab.errors import ConfigError, EmptyDatasetError, SandlabError
from sandlab.records import Record, read_jsonl, write_json, write_jsonl
from sandlab.reporting import funnel_row, plot_distributions, plot_funnel, print_results, throughput, write_results
from sandlab.runs import RunDir, repo_root

log = logging.getLogger("sandlab")
SHARDED_STAGES = ("generate", "solve", "filter", "difficulty", "export")  # record by record; the rest are global
# Stages a partition (one Slurm array task) runs on its own slice when they lead the recipe's data stages.
PARTITIONED_STAGES = ("generate", "solve", "filter", "difficulty")
# The config sections each stage's output depends on. A rerun in the same run.dir refuses to skip a
# finished stage whose sections (or those of an earlier stage) have changed since it ran.
STAGE_CONFIG = {
    "generate": ["run.seed", "teacher.model", "data.generate"],
    "solve": ["teacher.model", "data.solve"],
    "filter": ["data.agreement", "data.solve.include_reference"],
    "dedup": ["data.dedup"],
    "decontam": ["data.decontam"],
    "difficulty": ["teacher.model", "data.difficulty"],
    "hike": ["teacher.model", "data.hike"],
    "passrate": ["data.passrate"],
    "novelty": ["data.novelty"],
    "export": ["data.export"],
    "train": ["model.path", "model.chat_template", "data.dataset_path", "data.mix", "data.variants", "train"],
    "grpo": ["rl", "model.path"],
    "eval": ["eval"],
}
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
    def __init__(self, cfg: DictConfig, run_dir: str | Path, sweep: dict[str, Any] | None = None):
        self.raw_cfg = cfg
        self.sweep = sweep  # {"dir", "num", "overrides"} when this process is one point of a Hydra multirun
        self.cfg: RecipeConfig = validate_recipe(cfg)
        self.root = repo_root()
        self.root_run = self.run = RunDir(run_dir)
        part = self.cfg.data.partition
        self.partition_worker = part.count > 1 and part.index is not None
        if self.partition_worker:  # one array task: its own directory inside the run
            self.run = RunDir(self.partition_dir(part.index))
        self.data_dir = self.run.sub("data")
        self._teacher = None
        self._pool = None
        self._input_offset: int | None = None
        self._requests: list[Record] | None = None

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
    def partition_dir(self, index: int) -> Path:
        return self.root_run.path / "partitions" / f"{index:05d}-of-{self.cfg.data.partition.count:05d}"

    def partition_stages(self) -> list[str]:
        """The leading per-record data stages: what each partition runs on its own slice."""
        prefix = []
        for stage in (s for s in self.cfg.stages if s in DATA_STAGES):
            if stage not in PARTITIONED_STAGES:
                break
            prefix.append(stage)
        return prefix

    def _partition_slice(self, n: int) -> tuple[int, int]:
        part = self.cfg.data.partition
        return part.index * n // part.count, (part.index + 1) * n // part.count

    def input_offset(self) -> int:
        """Sampling-seed offset of this process's records: a partition starts at its first request's
        global position, so partitions never share seeds and generation samples what a whole run would."""
        if self._input_offset is None:
            self._input_offset = self._partition_slice(len(self._all_requests()))[0] if self.partition_worker else 0
        return self._input_offset

    def _all_requests(self) -> list[Record]:
        """Every generation request (or source problem) of the run, built once per process."""
        from sandlab.data_gen.generate import build_requests, load_source_problems  # noqa: PLC0415

        if self._requests is None:
            g = self.cfg.data.generate
            self._requests = load_source_problems(g) if g.source else build_requests(g, self.root, self.cfg.run.seed)
        return self._requests

    # ---- stage config fingerprints (resume safety) -------------------------------------------
    def stage_config(self, stage: str) -> dict[str, Any]:
        """Flattened config values that ``stage`` and the stages before it depend on."""
        plain = OmegaConf.to_container(self.raw_cfg, resolve=True)
        enabled = [s for s in self.cfg.stages if s in STAGE_CONFIG]
        upstream = enabled[: enabled.index(stage) + 1] if stage in enabled else [stage]
        if stage in ("train", "eval"):  # training reads the exported dataset, not the data settings
            upstream = ["export", stage] if "export" in enabled and not self.cfg.data.dataset_path else [stage]
        flat: dict[str, Any] = {}
        for key in dict.fromkeys(k for s in upstream for k in STAGE_CONFIG.get(s, [])):
            node: Any = plain
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            flat.update(_flatten(key, node))
        flat.pop("data.passrate.student.base_urls", None)
        return flat

    def _config_file(self, stage: str) -> Path:
        return self.run.path / "stages" / f"{stage}.config.json"

    def check_stage_config(self, stage: str, run: RunDir | None = None) -> None:
        path = (run.path / "stages" / f"{stage}.config.json") if run else self._config_file(stage)
        if not path.exists():  # run directories from before fingerprints: nothing to compare
            return
        before, now = json.loads(path.read_text()), self.stage_config(stage)
        changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if changed:
            k = changed[0]
            raise ConfigError(
                f"stage {stage} already ran in {path.parent.parent} with different settings ({k}: {before.get(k)!r} -> {now.get(k)!r}"
                f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}); use a new run.dir, or remove "
                f"{path.parent}/{stage}.done and the markers of later stages to redo them"
            )

    def mark_done(self, stage: str, summary: dict[str, Any]) -> None:
        write_json(self._config_file(stage), self.stage_config(stage))
        self.run.mark_done(stage, summary)

    def _records(self, stage: str) -> list[Record]:
        return read_jsonl(self.data_dir / f"{stage}.jsonl")

    def _finish_data_stage(self, stage: str, n_in: int, kept: list[Record], dropped: list[Record], hint: str, seconds: float | None = None) -> None:
        row = funnel_row(stage, n_in, kept, dropped, seconds)
        log.info("%s: %d in, %d kept, %d dropped %s", stage, n_in, len(kept), len(dropped), row["reasons"])
        # Dropped records are written even when the stage fails: they say why everything was dropped.
        write_jsonl(self.data_dir / f"{stage}.dropped.jsonl", dropped)
        if not kept and not self.partition_worker:  # one small partition may come out empty
            reasons = ", ".join(f"{k}: {v}" for k, v in row["reasons"].items()) or "none"
            raise EmptyDatasetError(f"stage '{stage}' kept 0 of {n_in} records (drop reasons: {reasons}); {hint}")
        write_jsonl(self.data_dir / f"{stage}.jsonl", kept)
        self.mark_done(stage, row)

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
        if self.cfg.data.agreement.mode == "single":
            from sandlab.data_gen.agreement import keep_first_complete  # noqa: PLC0415

            return keep_first_complete(records)
        if self.cfg.data.agreement.mode == "reference":
            from sandlab.data_gen.agreement import filter_by_reference  # noqa: PLC0415

            require_fields(records, "filter", ["reference_answer"], "data.agreement.mode=reference needs problems with reference answers")
            return filter_by_reference(records, self.cfg.data.agreement, self.pool)
        judge = self.teacher if self.cfg.data.agreement.llm_judge else None
        return filter_by_agreement(records, self.cfg.data.agreement, self.pool, include_reference=self.cfg.data.solve.include_reference, judge=judge, root=self.root)

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

        missing = [r.get("id") for r in records if r.get("answer") is None and r.get("reference_answer") is None]
        if missing:
            raise ConfigError(f"stage passrate: {len(missing)} records (e.g. id={missing[0]!r}) have no answer or reference_answer; run the solve and filter stages first")
        student_cfg = self.cfg.data.passrate.student
        if student_cfg.model == "tuned":  # the SFT model of this recipe (AM-Thinking selects RL prompts with it)
            student_cfg = dataclasses.replace(student_cfg, model=self.sft_model())
        with build_backend(student_cfg) as student:
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
            requests = self._all_requests()
            if self.partition_worker:
                lo, hi = self._partition_slice(len(requests))
                return requests[lo:hi]
            return requests
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
        base = self.input_offset() if stage in SHARDED_STAGES else 0
        if stage not in SHARDED_STAGES or size <= 0 or len(records) <= size:
            return fn(records, offset=base)
        shard_dir = self.data_dir / f"{stage}.shards-{size}"
        kept: list[Record] = []
        dropped: list[Record] = []
        for start in range(0, len(records), size):
            path = shard_dir / f"{start // size:06d}.json"
            if path.exists():
                done = json.loads(path.read_text())
            else:
                k, d = fn(records[start : start + size], offset=base + start)
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
            self._write_sft(kept, funnel_row(stage, len(records), kept, dropped, time.monotonic() - start))
        self._finish_data_stage(stage, len(records), kept, dropped, STAGE_HINTS[stage], seconds=time.monotonic() - start)
        for shards in self.data_dir.glob(f"{stage}.shards-*"):  # merged into <stage>.jsonl now
            shutil.rmtree(shards, ignore_errors=True)

    def _merge_partitions(self, stage: str) -> None:
        """Collect a per-record stage's output from every partition, in partition order."""
        count = self.cfg.data.partition.count
        runs = [RunDir(self.partition_dir(i)) for i in range(count)]
        missing = [i for i, r in enumerate(runs) if not r.is_done(stage)]
        if missing:
            raise EmptyDatasetError(
                f"stage {stage}: partition(s) {missing} of {count} have not finished it; rerun those array tasks "
                f"(sbatch --array={','.join(map(str, missing))} ...) with run.dir={self.run.path}, then merge again"
            )
        kept: list[Record] = []
        dropped: list[Record] = []
        n_in, seconds = 0, 0.0
        for run in runs:
            self.check_stage_config(stage, run)
            row = json.loads(run.done_marker(stage).read_text())
            n_in, seconds = n_in + row["in"], seconds + row.get("seconds", 0.0)
            data = run.path / "data"
            kept += read_jsonl(data / f"{stage}.jsonl") if (data / f"{stage}.jsonl").exists() else []
            dropped += read_jsonl(data / f"{stage}.dropped.jsonl") if (data / f"{stage}.dropped.jsonl").exists() else []
        ids = [r["id"] for r in kept]
        if len(ids) != len(set(ids)):
            raise SandlabError(f"stage {stage}: partitions overlap ({len(ids) - len(set(ids))} duplicate ids); were they run with different data.partition.count?")
        self._finish_data_stage(stage, n_in, kept, dropped, STAGE_HINTS[stage], seconds=seconds)

    def _write_sft(self, rows: list[Record], export_row: dict[str, Any]) -> None:
        """sft/train.jsonl (all variants), sft/<variant>/train.jsonl and a dataset card, sft/README.md."""
        from collections import defaultdict  # noqa: PLC0415

        from sandlab.reporting import dataset_card  # noqa: PLC0415
        from sandlab.runs import git_sha  # noqa: PLC0415

        sft = self.run.sub("sft")
        write_jsonl(sft / "train.jsonl", rows)
        by_variant: dict[str, list[Record]] = defaultdict(list)
        for row in rows:
            by_variant[row.get("variant") or "default"].append(row)
        for variant, subset in by_variant.items():
            write_jsonl(self.run.sub("sft", variant) / "train.jsonl", subset)
        d = self.cfg.data
        settings = {
            "generate": {"style": d.generate.style, "taxonomy": d.generate.taxonomy, "source": d.generate.source, "requested": d.generate.num_problems},
            "solve": {"k": d.solve.k, "include_reference": d.solve.include_reference, "temperature": d.solve.sampling.temperature},
            "agreement": {"mode": d.agreement.mode, "min_agreement": d.agreement.min_agreement, "min_votes": d.agreement.min_votes, "llm_judge": d.agreement.llm_judge},
            "dedup": {"embedding_model": d.dedup.embedding_model, "threshold": d.dedup.threshold, "minhash_threshold": d.dedup.minhash_threshold},
            "decontam": {"benchmarks": d.decontam.benchmarks, "ngram_n": d.decontam.ngram_n, "embedding_threshold": d.decontam.embedding_threshold},
            "export": {"min_words": d.export.min_words},
        }
        stages = [s for s in self.cfg.stages if s in DATA_STAGES]
        settings = {k: v for k, v in settings.items() if {"agreement": "filter"}.get(k, k) in stages} | {"stages": stages}
        card = dataset_card(rows, [*self.funnel(), export_row], name=d.name, recipe=self.cfg.recipe, teacher=self.cfg.teacher.model,
                            git_sha=git_sha(), settings=settings)
        (sft / "README.md").write_text(card)

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
                    chat_template_path=self._path(self.cfg.model.chat_template), mix=self.cfg.data.mix, variants=self.cfg.data.variants)
        if not is_main_process():
            return
        self.mark_done("train", {"model": model_path, "dataset": dataset, "output": str(self.tuned_dir())})

    def grpo_dir(self) -> Path:
        return self.run.path / "checkpoints" / "grpo"

    def grpo_final(self) -> Path:
        return self.grpo_dir() / f"stage-{len(self.cfg.rl.stages) - 1}"

    def rl_dataset(self) -> str:
        if self.cfg.rl.dataset_path:
            return self.cfg.rl.dataset_path
        for stage in ("passrate", "export"):  # pass-rate-selected prompts first
            if (self.data_dir / f"{stage}.jsonl").exists():
                return str(self.data_dir / f"{stage}.jsonl")
        raise EmptyDatasetError("GRPO needs prompts with answers: run the passrate stage (the SFT model as student) or set rl.dataset_path")

    def sft_model(self) -> str:
        """The SFT checkpoint that GRPO and its prompt selection start from."""
        from sandlab.models import resolve_model_path  # noqa: PLC0415

        if self.run.is_done("train"):
            return str(self.tuned_dir())
        if self.cfg.rl.init_from:
            return resolve_model_path(self.cfg.rl.init_from, what="rl.init_from")
        raise ConfigError("no SFT model: add the train stage or set rl.init_from=<sft run>/checkpoints/final")

    def stage_grpo(self) -> None:
        self.close()
        r = self.cfg.rl
        start = self.sft_model()
        dataset = self.rl_dataset()
        if r.num_processes > 1 and "WORLD_SIZE" not in os.environ:
            self._launch_distributed_training(entry="grpo.py", num_processes=r.num_processes, accelerate_config=r.accelerate_config)
        else:
            from sandlab.train.grpo import run_grpo  # noqa: PLC0415

            run_grpo(start, dataset, r, output_dir=str(self.grpo_dir()), run_name=f"{self.cfg.recipe}-grpo", seed=self.cfg.run.seed,
                     report_to=["wandb"] if self.cfg.wandb.mode != "disabled" else [], grading_timeout_s=self.cfg.eval.grading_timeout_s)
        if not is_main_process():
            return
        self.mark_done("grpo", {"model": start, "dataset": dataset, "output": str(self.grpo_final())})

    def _launch_distributed_training(self, entry: str = "sft.py", num_processes: int | None = None, accelerate_config: str | None = None) -> None:
        """Multi-process training goes through ``accelerate launch train/<entry>`` with the same recipe."""
        t = self.cfg.train
        num_processes = num_processes or t.num_processes
        launcher_config = self.run.path / "accelerate_config.yaml"
        launcher_config.write_text(write_accelerate_config(self.root, accelerate_config or t.accelerate_config, num_processes))
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher_config),
            "--num_processes", str(num_processes), str(self.root / "train" / entry),
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
        for entry in self.cfg.eval.models:
            name, target = self.eval_target(entry)
            model = {"base": self.cfg.model.path, "tuned": str(self.tuned_dir()), "grpo": str(self.grpo_final())}.get(target, target)
            # The base model is rendered with the recipe's template; a tuned checkpoint carries its own.
            template = self._path(self.cfg.model.chat_template) if target == "base" else None
            backend_cfg = dataclasses.replace(self.cfg.eval.backend, model=model, chat_template=template or self.cfg.eval.backend.chat_template)
            out = self.run.sub("eval", name.replace("/", "__"))
            with build_backend(backend_cfg) as backend:
                results[name] = {b: evaluate_benchmark(backend, self.pool, b, self.cfg.eval, out / b) for b in self.cfg.eval.benchmarks}
        write_json(self.run.path / "eval" / "results.json", results)
        self.mark_done("eval", {"models": list(results)})

    @staticmethod
    def eval_target(entry: str) -> tuple[str, str]:
        """``label=model`` -> (label, model); a bare entry labels itself."""
        label, sep, target = entry.partition("=")
        return (label.strip(), target.strip()) if sep else (entry, entry)

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
        if self.cfg.eval.table and results:
            from sandlab.eval.tables import write_table  # noqa: PLC0415

            log.info("paper table: %s", write_table(self.cfg.eval.table, results, self.run.path / "tables"))
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

        d = self.cfg.data
        needs_teacher = (any(s in ("generate", "solve", "difficulty", "hike") for s in selected) or ("decontam" in selected and d.decontam.llm_judge)
                         or ("filter" in selected and d.agreement.llm_judge and d.agreement.mode == "majority"))
        if needs_teacher:
            if self.cfg.teacher.backend == "openai":
                self.teacher.check_health()
            else:
                resolve_model_path(self.cfg.teacher.model, what="teacher.model")
        if "train" in selected or ("eval" in selected and "base" in [self.eval_target(e)[1] for e in self.cfg.eval.models]):
            resolve_model_path(self.cfg.model.path, what="model.path")
        if ("grpo" in selected or ("passrate" in selected and d.passrate.student.model == "tuned")) and "train" not in self.cfg.stages:
            self.sft_model()
        require_training_data(self.cfg, selected, self.run.path)
        if self.cfg.data.dataset_path and "train" in selected:
            path = self.cfg.data.dataset_path
            if not Path(path).exists() and looks_like_local_path(path):
                raise EmptyDatasetError(f"data.dataset_path={path!r} does not exist; give a JSONL file/dir or a Hub dataset id")
        template = self._path(self.cfg.model.chat_template)
        if template and not Path(template).is_file():
            raise ConfigError(f"model.chat_template={self.cfg.model.chat_template!r} is not a file")
        if "train" in selected and not self.run.is_done("train") and "WORLD_SIZE" not in os.environ:
            from sandlab.train.validate import validate_training  # noqa: PLC0415

            dataset = self.sft_dataset()
            checked = validate_training(resolve_model_path(self.cfg.model.path), self.cfg.train, accelerate_config=self.root / self.cfg.train.accelerate_config,
                                        chat_template_path=template, dataset_path=dataset if (self.cfg.data.dataset_path or Path(dataset).exists()) else None,
                                        mix=self.cfg.data.mix, variants=self.cfg.data.variants)
            log.info("training config checked: %s", checked)
        from sandlab.benchmarks import load_benchmark  # noqa: PLC0415

        needed = (self.cfg.eval.benchmarks if "eval" in selected else []) + (self.cfg.data.decontam.benchmarks if "decontam" in selected else [])
        for name in dict.fromkeys(needed):
            load_benchmark(name, limit=1)
        targets = [self.eval_target(e)[1] for e in self.cfg.eval.models]
        if "eval" in selected and "tuned" in targets and "train" not in selected and not self.tuned_dir().exists():
            raise EmptyDatasetError(f"eval.models has 'tuned' but {self.tuned_dir()} does not exist; train first or set run.dir to a trained run")

    def run_stages(self, stages: list[str] | None = None) -> None:
        from sandlab.tracking import finish_wandb  # noqa: PLC0415

        selected = [s for s in self.cfg.stages if (stages is None or s in stages) and (not self.cfg.run.only or s in self.cfg.run.only)]
        if self.cfg.data.dataset_path:
            selected = [s for s in selected if s not in DATA_STAGES]
        merged: list[str] = []
        if self.cfg.data.partition.count > 1:
            prefix = self.partition_stages()
            if self.partition_worker:
                selected = [s for s in selected if s in prefix]
                if not selected:
                    raise ConfigError(f"data.partition.index is set, but none of the selected stages is one a partition runs ({list(PARTITIONED_STAGES)} leading the recipe's data stages)")
            else:
                merged = [s for s in selected if s in prefix]
        for stage in selected:
            if stage != "report" and self.run.is_done(stage):
                self.check_stage_config(stage)
        self.preflight([s for s in selected if s not in merged])
        main = is_main_process()  # under `accelerate launch`, only rank 0 records the run
        if main:
            self.run.write_metadata(self.raw_cfg, stages=selected, jobs_log=self.root_run.path / "jobs.jsonl")
        if main and self.cfg.wandb.mode != "disabled":
            self._init_wandb(selected)
        try:
            for stage in selected:
                if stage != "report" and self.run.is_done(stage):
                    log.info("%s: already done in %s, skipping", stage, self.run.path)
                    continue
                log.info("stage %s", stage)
                if stage in merged:
                    self._merge_partitions(stage)
                elif stage in DATA_STAGES:
                    self._run_data_stage(stage)
                else:
                    getattr(self, f"stage_{stage}")()
                if main:
                    self._log_artifacts(stage)
        finally:
            self.close()
            finish_wandb()

    # ---- tracking ----------------------------------------------------------------------------
    def job_type(self, selected: list[str]) -> str:
        if self.cfg.wandb.job_type:
            return self.cfg.wandb.job_type
        kinds = list(dict.fromkeys(stage_kind(s) for s in selected if s != "report")) or ["eval"]
        return kinds[0] if len(kinds) == 1 else "pipeline"

    def _init_wandb(self, selected: list[str]) -> None:
        from sandlab.runs import git_sha, slurm_info  # noqa: PLC0415
        from sandlab.tracking import init_wandb, stable_run_id  # noqa: PLC0415

        w = self.cfg.wandb
        job_type = self.job_type(selected)
        group, tags = w.group, []
        name = w.name or f"{self.cfg.recipe}-{self.root_run.path.name}"
        if self.sweep is not None:  # every point of a sweep in one group, named by its number
            if not w.group or w.group == self.cfg.recipe:
                group = f"{self.cfg.recipe}-sweep-{Path(self.sweep['dir']).name}"
            name = w.name or f"{group}-{self.sweep['num']}"
            tags = ["sweep", *self.sweep["overrides"]][:20]
        if job_type != "pipeline":
            name += f"-{job_type}"
        if self.partition_worker:
            name += f"-part{self.cfg.data.partition.index}"
        config = OmegaConf.to_container(self.raw_cfg, resolve=True)
        config.pop("hydra", None)
        config.update(git_sha=git_sha(), run_dir=str(self.root_run.path), slurm=slurm_info(), stages_run=selected,
                      sweep={k: v for k, v in self.sweep.items() if k != "dir"} if self.sweep else None)
        try:
            init_wandb(w, name=name, run_dir=str(self.run.path), config=config, job_type=job_type, group=group, tags=tags,
                       run_id=stable_run_id(str(self.run.path), name))
        except Exception as exc:  # noqa: BLE001 (tracking must never stop a job; the run directory has everything)
            log.warning("W&B tracking is off for this process: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _log_artifacts(self, stage: str) -> None:
        """The exported dataset and the evaluation tables become W&B artifacts of the run."""
        from sandlab.tracking import log_artifact  # noqa: PLC0415

        recipe = self.cfg.recipe
        if stage == "export" and (self.run.path / "sft").is_dir():
            log_artifact(f"{recipe}-sft", "dataset", [self.run.path / "sft"], description=self.cfg.description,
                         metadata={"funnel": self.funnel(), "run_dir": str(self.run.path)})
        elif stage == "report" and (self.run.path / "results.csv").is_file():
            tables_dir = self.run.path / "tables"
            tables = {"results": self.run.path / "results.csv", **{p.stem: p for p in sorted(tables_dir.glob("*.csv"))}}
            paths = [self.run.path / "results.csv", self.run.path / "report.md", self.run.path / "eval" / "results.json", tables_dir]
            log_artifact(f"{recipe}-eval", "eval-results", [p for p in paths if p.exists()], metadata={"run_dir": str(self.run.path)}, tables=tables)


def require_training_data(cfg: RecipeConfig, stages: list[str], run_dir: Path) -> None:
    """Training needs this run's data stages, data.dataset_path, or an SFT file already in the run."""
    if "train" not in stages or cfg.data.dataset_path or any(s in DATA_STAGES for s in cfg.stages):
        return
    if not (run_dir / "sft" / "train.jsonl").exists():
        raise ConfigError(f"recipe {cfg.recipe} trains on an existing SFT dataset: set data.dataset_path=<run>/sft, a JSONL file or a Hub id "
                          f"(or run.dir=<a run with sft/train.jsonl>)")


def write_accelerate_config(root: Path, accelerate_config: str, num_processes: int, *, num_machines: int = 1) -> str:
    """The accelerate config a launch uses, as YAML: the DeepSpeed JSON path made absolute (so it works
    from any directory and the run records what it used) and the process/machine counts filled in."""
    import yaml  # noqa: PLC0415

    path = root / accelerate_config
    if not path.is_file():
        raise ConfigError(f"accelerate config {accelerate_config!r} does not exist (train.accelerate_config / rl.accelerate_config)")
    acc = yaml.safe_load(path.read_text()) or {}
    ds = acc.get("deepspeed_config") or {}
    if ds.get("deepspeed_config_file") and not Path(ds["deepspeed_config_file"]).is_absolute():
        ds["deepspeed_config_file"] = str(root / ds["deepspeed_config_file"])
    if ds and num_machines > 1:
        ds["deepspeed_multinode_launcher"] = "standard"  # torchrun on every node, no pdsh/ssh
    acc["num_processes"] = num_processes
    acc["num_machines"] = num_machines
    return yaml.safe_dump(acc, sort_keys=False)


def _flatten(prefix: str, node: Any) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(f"{prefix}.{key}", value))
        return out
    return {prefix: node}
