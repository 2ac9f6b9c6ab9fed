"""``sandlab-submit --config-name <recipe> [--dry-run] [overrides...]``: render the recipe's Slurm jobs
(slurm/templates/, cluster settings from ``cluster=<recipes/cluster/*.yaml>``), submit them with
dependencies between them and print their job ids. ``--dry-run`` prints the scripts, the GPU-hour
estimate and the per-GPU memory plan, and submits nothing. A job whose memory plan does not fit the
cluster's GPUs stops the submission (dry run included) with one line and the cheapest changes that fit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from sandlab.errors import ConfigError, SandlabError
from sandlab.records import write_json


def main(argv: list[str] | None = None) -> None:
    from sandlab.launch.cli import compose_recipe  # noqa: PLC0415
    from sandlab.launch.cost import estimate, format_estimate  # noqa: PLC0415
    from sandlab.launch.memory import misfit_message, plan_recipe  # noqa: PLC0415
    from sandlab.launch.slurm import (  # noqa: PLC0415
        JobPlanner,
        check_submittable,
        refuse_secret_overrides,
        sbatch_command,
        selected_stages,
        submit_jobs,
        training_layout,
    )
    from sandlab.stages import load_recipe  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="sandlab-submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", "-cn", required=True, help="the recipe (recipes/<name>.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the rendered scripts and the GPU-hour estimate; submit nothing")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown option {bad[0]} (Hydra overrides are key=value)")
    try:
        refuse_secret_overrides(overrides)
        composed = compose_recipe(args.config_name, overrides)
        if "train" in composed.stages and (not composed.run.only or "train" in composed.run.only):
            # The world size follows the nodes asked for; gradient accumulation keeps the global batch.
            layout = training_layout(composed, "train")[1]
            if layout:
                print(f"training on {composed.launcher.train.nodes} node(s): {' '.join(layout)}", file=sys.stderr)
                overrides = [*overrides, *layout]
                composed = compose_recipe(args.config_name, overrides)
        run_dir = Path(OmegaConf.select(composed, "run.dir")).absolute()
        composed.run.dir = str(run_dir)  # ${now:...} resolved once: every job shares this directory
        cfg = load_recipe(composed)
        check_submittable(cfg)
        planner = JobPlanner(cfg, args.config_name, overrides, run_dir)
        jobs = planner.plan()
        lines, peak = estimate(cfg, run_dir, selected_stages(cfg))
        cost = format_estimate(lines, peak, cfg.cluster.name)
        plan = plan_recipe(cfg, planner.repo, selected_stages(cfg))
        if plan is not None:
            cost += "\n" + plan.format()
        if plan is not None and not plan.fits:
            if args.dry_run:
                print(cost)
            else:
                print(cost, file=sys.stderr)
            raise ConfigError(misfit_message(plan))
        if args.dry_run:
            for i, job in enumerate(jobs):
                path = planner.slurm_dir / (f"logs/{job.name}-%j.out" if job.wrap is not None else f"{i:02d}-{job.name}.sbatch")
                print(f"# ---- job {i}: {job.name} (stages: {', '.join(job.stages) or '-'})")
                print("# $ " + " ".join(sbatch_command(job, jobs, path, cfg)))
                if job.script:
                    print(job.script)
            for path, text in planner.extra_files.items():
                print(f"# ---- {path}\n{text}")
            print(cost)
            return
        if plan is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "memory_plan.json", plan.to_dict())
        submit_jobs(jobs, planner)
    except SandlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(cost)
    print(f"run directory: {run_dir}")
    for job in jobs:
        deps = ", ".join(f"{kind} {jobs[i].name}" for kind, i in job.after)
        print(f"submitted {job.name:<32} job {job.job_id}{f' (array {job.array})' if job.array else ''}{f'  [{deps}]' if deps else ''}")


if __name__ == "__main__":
    main()
