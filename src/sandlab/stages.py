"""The stage registry. Every stage is declared once, as a ``Stage`` next to its logic (data stages in
``sandlab/data_gen/<stage>.py``); the pipeline, the standalone path, preflight, resume fingerprints
and the Slurm planner read what they need from these declarations.

Adding a stage: write its module with a module-level ``STAGE = Stage(...)`` (or ``STAGES = (...)``)
and add the module to ``STAGE_MODULES``, where its position is the stage's place in the order.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandlab.errors import ConfigError, EmptyDatasetError
from sandlab.records import Record, read_jsonl
from sandlab.runs import RunDir

if TYPE_CHECKING:
    from sandlab.config import RecipeConfig

# One entry per stage module, in the order the stages run.
STAGE_MODULES = (
    "sandlab.data_gen.generate",
    "sandlab.data_gen.solve",
    "sandlab.data_gen.filter",
    "sandlab.data_gen.score",
    "sandlab.data_gen.dedup",
    "sandlab.data_gen.decontam",
    "sandlab.data_gen.difficulty",
    "sandlab.data_gen.hike",
    "sandlab.data_gen.passrate",
    "sandlab.data_gen.novelty",
    "sandlab.data_gen.diversity",
    "sandlab.data_gen.export",
    "sandlab.train.stages",
    "sandlab.eval.stage",
    "sandlab.reporting",
)


class Kind(StrEnum):
    DATA = "data"  # records in -> (kept, dropped)
    TRAIN = "train"  # a model out
    EVAL = "eval"
    REPORT = "report"


def never(_cfg: RecipeConfig) -> bool:
    return False


def always(_cfg: RecipeConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """What the machinery needs to know about a stage.

    ``run``: data stages ``run(ctx, records, offset) -> (kept, dropped)``, where ``offset`` is the
    position of the first record in the whole input (sampling seeds follow it, so a sharded, resumed
    or partitioned run samples what an uninterrupted one does); other stages ``run(ctx) -> summary``
    (None on a non-main rank: nothing is marked done there).
    """

    name: str
    kind: Kind
    run: Callable[..., Any]
    # Config sections the output depends on (or a function of the recipe giving them): a changed one blocks skipping on rerun.
    config: tuple[str, ...] | Callable[[RecipeConfig], tuple[str, ...]] = ()
    hint: str = ""  # what to change when the stage keeps nothing
    per_record: bool = False  # records are independent: it runs shard by shard and resumes at the first unfinished shard
    # Per-record stages: a step over all records after the shards, ``finish(ctx, kept, dropped) -> (kept, dropped)``,
    # for a selection that compares records (the best fraction of each taxonomy leaf). Not with partitionable.
    finish: Callable[[StageContext, list[Record], list[Record]], tuple[list[Record], list[Record]]] | None = None
    partitionable: bool = False  # a Slurm array task can run it on its own slice of the input
    needs_teacher: Callable[[RecipeConfig], bool] = never
    needs_student: bool = False  # runs the student (model.path or a checkpoint of this run)
    needs_gpu: Callable[[RecipeConfig], bool] = never  # runs a model of its own on a cluster job's GPUs, beside any served teacher
    reads_export_only: bool = False  # depends on the exported dataset, not on the data stages' settings
    preflight: Callable[[StageContext], None] | None = None  # quick checks before any model loads
    write_outputs: Callable[[StageContext, list[Record], dict[str, Any]], None] | None = None  # data stages: files beside <stage>.jsonl
    make_inputs: Callable[[StageContext], list[Record]] | None = None  # a first stage builds its own input
    input_fields: tuple[str, ...] = ()  # fields every input record needs
    input_hint: str = ""  # what to run first when they are missing
    # What a started run saved and a resumed one would reuse (data stages: their shards and rounds).
    saved: Callable[[StageContext], list[Path]] | None = None

    def config_keys(self, cfg: RecipeConfig) -> tuple[str, ...]:
        return self.config(cfg) if callable(self.config) else self.config

    def saved_results(self, ctx: StageContext) -> list[Path]:
        """The saved results of an unfinished (or finished) run of this stage in ``ctx``'s run directory."""
        if self.saved is not None:
            paths = self.saved(ctx)
        elif self.kind is Kind.DATA:
            paths = [*ctx.data_dir.glob(f"{self.name}.shards-*"), *ctx.data_dir.glob(f"{self.name}.rounds")]
        else:
            paths = []
        return sorted(p for p in paths if holds_results(p))

    @property
    def job(self) -> str:
        """The Slurm job (and W&B job type) it belongs to: data, train, grpo or eval (report goes with eval)."""
        if self.kind is Kind.DATA:
            return "data"
        return self.name if self.kind is Kind.TRAIN else "eval"


def holds_results(path: Path) -> bool:
    """A saved file, or a directory with one in it (a kill can leave one empty or with a half-written
    hidden temporary file, which a resume does not reuse)."""
    if path.is_file():
        return not path.name.startswith(".")
    return path.is_dir() and any(p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts) for p in path.rglob("*"))


@cache
def registry() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    for module_name in STAGE_MODULES:
        module = importlib.import_module(module_name)
        declared = getattr(module, "STAGES", None) or (module.STAGE,)
        for stage in declared:
            if stage.name in stages:
                raise RuntimeError(f"stage {stage.name!r} is declared twice ({module_name})")
            if stage.finish is not None and (stage.partitionable or not stage.per_record):
                raise RuntimeError(f"stage {stage.name!r}: finish needs per_record and no partitions (it sees the whole input)")
            stages[stage.name] = stage
    return stages


def get_stage(name: str) -> Stage:
    try:
        return registry()[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; choose from {list(registry())}") from None


def stage_names(kind: Kind | None = None) -> tuple[str, ...]:
    return tuple(name for name, stage in registry().items() if kind is None or stage.kind is kind)


def data_stage_names() -> tuple[str, ...]:
    return stage_names(Kind.DATA)


def is_data_stage(name: str) -> bool:
    stage = registry().get(name)
    return stage is not None and stage.kind is Kind.DATA


def check_recipe_stages(recipe: RecipeConfig) -> RecipeConfig:
    """The recipe's stage lists name registered stages, and what its data stages make fits the rest."""
    known = registry()
    unknown = [s for s in recipe.stages if s not in known]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; choose from {list(known)}")
    not_in_recipe = [s for s in recipe.run.only or [] if s not in recipe.stages]
    if not_in_recipe:
        raise ConfigError(f"run.only={not_in_recipe} names stages this recipe does not have; its stages: {recipe.stages}")
    d = recipe.data
    from sandlab.readers import mix_entry  # noqa: PLC0415 (a bad data.mix entry fails before anything runs)

    for entry in d.mix:
        mix_entry(entry, str(d.format))
    makes_data = any(is_data_stage(s) for s in recipe.stages)
    if "train" in recipe.stages and makes_data and d.variants and not d.dataset_path and not d.mix:
        produced = {d.export.variant} | ({"hiked"} if "hike" in recipe.stages else set())
        foreign = [v for v in d.variants if v not in produced]
        if foreign:
            raise ConfigError(f"data.variants includes {foreign}, which this run's data stages do not produce ({sorted(produced)}); "
                              "add their exports with data.mix=[<run>/sft, ...]")
    return recipe


def load_recipe(cfg: Any) -> RecipeConfig:
    """A composed recipe merged into the schema (``sandlab.config.validate_recipe``) with its stages checked."""
    from sandlab.config import validate_recipe  # noqa: PLC0415

    return check_recipe_stages(validate_recipe(cfg))


def require_fields(records: list[Record], stage: str, fields: list[str] | tuple[str, ...], hint: str) -> None:
    for i, rec in enumerate(records):
        missing = [f for f in fields if f not in rec]
        if missing:
            raise ConfigError(f"stage {stage}: record {i + 1} (id={rec.get('id')!r}) lacks {missing}; {hint}")


class StageContext:
    """What a stage may use: the recipe, the run directory and shared services created on first use."""

    def __init__(self, cfg: RecipeConfig, root: Path, run: RunDir, *, data_dir: Path | None = None, partition_worker: bool = False):
        self.cfg = cfg
        self.root = root
        self.run = run
        self.data_dir = data_dir or run.sub("data")  # where data stages write their records and side files
        self.partition_worker = partition_worker  # one Slurm array task of a partitioned run
        self.selected: list[str] = []  # the stages this process runs
        self._teacher = None
        self._pool = None
        self._code_verifier = None
        self._reward_model = None

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

    @property
    def code_verifier(self):
        """The sandboxed test runner (``cfg.verify``); its canary check runs on first use."""
        if self._code_verifier is None:
            from sandlab.verification import CodeVerifier  # noqa: PLC0415

            self._code_verifier = CodeVerifier.from_config(self.cfg.verify)
        return self._code_verifier

    @property
    def reward_model(self):
        """The score stage's reward model (``cfg.data.score.reward_model``)."""
        if self._reward_model is None:
            from sandlab.inference.reward_model import RewardModel  # noqa: PLC0415

            self._reward_model = RewardModel(self.cfg.data.score.reward_model)
        return self._reward_model

    def close(self) -> None:
        """Free the teacher engine (its GPU/CPU memory), the reward model, the grading workers and the sandboxes."""
        if self._reward_model is not None:
            self._reward_model.close()
            self._reward_model = None
        if self._code_verifier is not None:
            self._code_verifier.close()
            self._code_verifier = None
        if self._teacher is not None:
            self._teacher.close()
            self._teacher = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # ---- where things live in a run ----------------------------------------------------------
    @property
    def embedding_store(self) -> Path | None:
        """The run's EmbeddingStore directory (data/embeddings), or None with data.embedding_store=false."""
        return self.data_dir / "embeddings" if self.cfg.data.embedding_store else None

    def path(self, value: str | None) -> str | None:
        """Recipe paths are relative to the repository root."""
        if not value:
            return None
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else self.root / path)

    def records(self, stage: str) -> list[Record]:
        return read_jsonl(self.data_dir / f"{stage}.jsonl")

    def funnel(self) -> list[dict[str, Any]]:
        markers = [self.run.done_marker(stage) for stage in data_stage_names()]
        return [json.loads(m.read_text()) for m in markers if m.exists()]

    def sft_dataset(self) -> str:
        return self.cfg.data.dataset_path or str(self.run.path / "sft" / "train.jsonl")

    def tuned_dir(self) -> Path:
        return self.run.path / "checkpoints" / "final"

    def grpo_dir(self) -> Path:
        return self.run.path / "checkpoints" / "grpo"

    def grpo_final(self) -> Path:
        return self.grpo_dir() / f"stage-{len(self.cfg.rl.stages) - 1}"

    def sft_model(self) -> str:
        """The SFT checkpoint that GRPO and its prompt selection start from."""
        from sandlab.models import resolve_model_path  # noqa: PLC0415

        if self.run.is_done("train"):
            return str(self.tuned_dir())
        if self.cfg.rl.init_from:
            return resolve_model_path(self.cfg.rl.init_from, what="rl.init_from")
        raise ConfigError("no SFT model: add the train stage or set rl.init_from=<sft run>/checkpoints/final")

    def rl_dataset(self) -> str:
        if self.cfg.rl.dataset_path:
            return self.cfg.rl.dataset_path
        for stage in ("passrate", "export"):  # pass-rate-selected prompts first
            if (self.data_dir / f"{stage}.jsonl").exists():
                return str(self.data_dir / f"{stage}.jsonl")
        raise EmptyDatasetError("GRPO needs prompts with answers: run the passrate stage (the SFT model as student) or set rl.dataset_path")

    def eval_models(self) -> list[tuple[str, str]]:
        """``eval.models`` as (label, target): ``label=model``, or a bare entry labelled by itself."""
        pairs = []
        for entry in self.cfg.eval.models:
            label, sep, target = entry.partition("=")
            pairs.append((label.strip(), target.strip()) if sep else (entry, entry))
        return pairs
