"""Hydra entry points. ``sandlab --config-name <recipe>`` runs a whole recipe; the thin scripts in
data_gen/, train/ and eval/ run their own stages of the same recipe in the same run directory.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sandlab.errors import SandlabError
from sandlab.runs import repo_root

log = logging.getLogger("sandlab")


def recipes_dir() -> str:
    return os.environ.get("SANDLAB_RECIPES_DIR", str(repo_root() / "recipes"))


def make_main(stages: Sequence[str] | None = None, default_recipe: str = "demo") -> Callable[[], None]:
    """Build a Hydra app running ``stages`` (None: all the recipe's stages)."""
    import hydra  # noqa: PLC0415
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.types import RunMode  # noqa: PLC0415
    from omegaconf import DictConfig  # noqa: PLC0415

    import sandlab.config  # noqa: F401, PLC0415 (registers the recipe schema with Hydra)

    @hydra.main(config_path=recipes_dir(), config_name=default_recipe, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        from sandlab.launch.pipeline import Pipeline  # noqa: PLC0415

        hydra_cfg = HydraConfig.get()
        run_dir = hydra_cfg.runtime.output_dir
        sweep = None
        if hydra_cfg.mode == RunMode.MULTIRUN:  # one point of a sweep: its W&B group, name and tags
            sweep = {"dir": hydra_cfg.sweep.dir, "num": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task)}
        try:
            pipeline = Pipeline(cfg, run_dir, sweep=sweep)
            if cfg.get("stage"):  # one data stage on a user's JSONL file
                pipeline.run_single_stage(cfg.stage, cfg.get("input"), cfg.get("output"))
            else:
                pipeline.run_stages(list(stages) if stages else None)
        except SandlabError as exc:
            log.error("%s", exc)
            print(f"error: {exc}", file=sys.stderr)
            if sweep is not None:  # the other points go on; the sweep summary reports this one and fails
                Path(run_dir, "error.txt").write_text(f"{exc}\n")
                return
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"interrupted; rerun with run.dir={run_dir} to resume", file=sys.stderr)
            sys.exit(130)

    return app


def precheck_overrides(argv: list[str], default_recipe: str) -> None:
    """Compose the recipe once before Hydra does, so a bad override or recipe name is one line.

    Hydra would report the same problem over several lines; flags other than the config name/dir
    (multirun, --cfg, ...) are left to Hydra itself.
    """
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    import sandlab.config  # noqa: F401, PLC0415 (registers the recipe schema with Hydra)

    config_name, config_dir, overrides, i = default_recipe, recipes_dir(), [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config-name", "-cn", "--config-dir", "-cd") and i + 1 < len(argv):
            if arg in ("--config-name", "-cn"):
                config_name = argv[i + 1]
            else:
                config_dir = str(Path(argv[i + 1]).resolve())
            i += 2
            continue
        if arg.startswith(("-", "hydra.", "hydra/")):
            return
        overrides.append(arg)
        i += 1
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except Exception as exc:  # noqa: BLE001 (any composition error is the user's to fix)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith(("Config search path", "provider=", "In config", "Set the environment"))]
        cause = str(exc.__cause__).strip().splitlines() if exc.__cause__ else []
        if cause:  # e.g. "Value 'fast' of type 'str' could not be converted to Float"
            lines.append(f"({cause[0].strip()})")
        print(f"error: {' '.join(lines)[:500]}", file=sys.stderr)
        sys.exit(2)


def compose_recipe(config_name: str, overrides: list[str]):
    """The recipe as Hydra composes it, without starting a Hydra app (for tools such as inspection)."""
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    import sandlab.config  # noqa: F401, PLC0415

    precheck_overrides(["--config-name", config_name, *overrides], config_name)
    with initialize_config_dir(config_dir=recipes_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def inspect_main(argv: list[str] | None = None) -> None:
    """``python train/inspect_data.py --config-name <recipe> [--samples N] [overrides]``: a rendered
    training sample with its loss mask, token counts and the share cut at train.trl.max_length."""
    import argparse  # noqa: PLC0415

    from sandlab.models import resolve_model_path  # noqa: PLC0415
    from sandlab.stages import load_recipe  # noqa: PLC0415
    from sandlab.train.inspect import inspect_dataset  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=inspect_main.__doc__)
    parser.add_argument("--config-name", "-cn", default="demo")
    parser.add_argument("--samples", type=int, default=1, help="rendered samples to print")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_recipe(compose_recipe(args.config_name, overrides))
        dataset = cfg.data.dataset_path
        if not dataset:
            candidate = Path(cfg.run.dir) / "sft" / "train.jsonl"
            if not candidate.exists():
                raise SandlabError("set data.dataset_path=<sft jsonl or Hub id>, or run.dir=<a run with sft/train.jsonl>")
            dataset = str(candidate)
        template = cfg.model.chat_template
        template = str(template if Path(template).is_absolute() else repo_root() / template) if template else None
        inspect_dataset(resolve_model_path(cfg.model.path), dataset, cfg.train, chat_template_path=template, samples=args.samples,
                        mix=cfg.data.mix, variants=cfg.data.variants, data_format=str(cfg.data.format), data_config=cfg.data.config,
                        data_split=cfg.data.split)
    except SandlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


# vLLM's engine processes can leave semaphores for Python's resource tracker to reap at exit; its
# warning would then print after a run's one-line error. The tracker is a child process started
# later, so it reads this from the environment.
QUIET_RESOURCE_TRACKER = "ignore:resource_tracker:UserWarning"


def run(stages: Sequence[str] | None = None, default_recipe: str = "demo") -> None:
    warnings = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = f"{warnings},{QUIET_RESOURCE_TRACKER}" if warnings else QUIET_RESOURCE_TRACKER
    precheck_overrides(sys.argv[1:], default_recipe)
    make_main(stages, default_recipe)()


def main() -> None:
    run()


if __name__ == "__main__":
    main()
