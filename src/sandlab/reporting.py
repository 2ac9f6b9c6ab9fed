"""Run reports: funnel (items in/out per stage with drop reasons), results table, plots."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from sandlab.records import Record, read_jsonl
from sandlab.stages import Kind, Stage, StageContext

log = logging.getLogger("sandlab")


def teacher_tokens(stage: str, kept: list[Record], dropped: list[Record]) -> int:
    """Teacher output tokens spent by the stage that produced them (counted once, not per stage)."""
    if stage == "generate":
        return sum((r.get("generation_usage") or {}).get("completion_tokens", 0) for r in kept) + sum(d.get("completion_tokens", 0) for d in dropped)
    if stage == "solve":
        return sum(s.get("completion_tokens", 0) for r in kept for s in r.get("solutions", []))
    return 0


def funnel_row(stage: str, n_in: int, kept: list[Record], dropped: list[Record], seconds: float | None = None) -> dict[str, Any]:
    row = {"stage": stage, "in": n_in, "out": len(kept), "dropped": len(dropped), "reasons": dict(Counter(d.get("reason", "unknown") for d in dropped))}
    row["teacher_tokens"] = teacher_tokens(stage, kept, dropped)
    if seconds is not None:
        row["seconds"] = round(seconds, 2)
    return row


def throughput(funnel: list[dict[str, Any]]) -> dict[str, float] | None:
    """Accepted problems per hour and teacher tokens per accepted problem over the data stages."""
    if not funnel:
        return None
    accepted = funnel[-1]["out"]
    tokens = sum(r.get("teacher_tokens", 0) for r in funnel)
    seconds = sum(r.get("seconds", 0.0) for r in funnel)
    return {
        "accepted": accepted,
        "teacher_tokens": tokens,
        "teacher_tokens_per_accepted": tokens / accepted if accepted else float("nan"),
        "accepted_per_hour": 3600.0 * accepted / seconds if seconds else float("nan"),
        "data_seconds": seconds,
    }


def plot_funnel(funnel: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = ["requested"] + [row["stage"] for row in funnel]
    counts = [funnel[0]["in"]] + [row["out"] for row in funnel]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(labels) + 1.2))
    bars = ax.barh(labels[::-1], counts[::-1], color="#4C72B0")
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("records")
    ax.set_title("Data funnel")
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distributions(records: list[Record], path: Path) -> bool:
    """Branch distribution of the final records and, when rated, their difficulty histogram."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if not records:
        return False
    branches = Counter((r.get("source") or r).get("branch") or "unknown" for r in records)
    difficulties = [r["difficulty"] for r in records if isinstance(r.get("difficulty"), (int, float))]
    panels = 2 if difficulties else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4))
    axes = [axes] if panels == 1 else list(axes)
    names = sorted(branches, key=branches.get, reverse=True)
    axes[0].barh(names[::-1], [branches[n] for n in names][::-1], color="#55A868")
    axes[0].set_title("Branch distribution")
    axes[0].set_xlabel("records")
    if difficulties:
        axes[1].hist(difficulties, bins=[x / 2 for x in range(2, 22)], color="#C44E52")
        axes[1].set_title("Difficulty (judge rating)")
        axes[1].set_xlabel("rating (1-10)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def funnel_markdown(funnel: list[dict[str, Any]]) -> list[str]:
    """The funnel table (items in/out per stage with drop reasons) and the throughput line."""
    lines = ["| stage | in | out | dropped | reasons |", "|---|---|---|---|---|"]
    for row in funnel:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(row["reasons"].items())) or "-"
        lines.append(f"| {row['stage']} | {row['in']} | {row['out']} | {row['dropped']} | {reasons} |")
    tp = throughput(funnel)
    lines += ["", f"Throughput: {tp['accepted']} accepted problems, {tp['teacher_tokens']:,} teacher tokens "
              f"({tp['teacher_tokens_per_accepted']:,.0f} per accepted problem), {tp['accepted_per_hour']:,.0f} accepted problems/hour "
              f"over {tp['data_seconds']:.0f} s of data stages."]
    return lines


def dataset_card(rows: list[Record], funnel: list[dict[str, Any]], *, name: str, recipe: str, teacher: str, git_sha: str,
                 settings: dict[str, Any]) -> str:
    """A Hugging Face dataset card (README.md) for an exported SFT set: one config per variant, the
    funnel numbers and the settings that produced it."""
    import yaml  # noqa: PLC0415

    variants = Counter(r.get("variant") or "default" for r in rows)
    configs = [{"config_name": "all", "data_files": "train.jsonl", "default": True}]
    configs += [{"config_name": v, "data_files": f"{v}/train.jsonl"} for v in sorted(variants)]
    header = {"pretty_name": name, "license": "other", "task_categories": ["text-generation"], "tags": ["synthetic", "reasoning", "sandlab", *sorted(variants)],
              "size_categories": [_size_category(len(rows))], "configs": configs}
    words = {v: [len(r["completion"][-1]["content"].split()) for r in rows if (r.get("variant") or "default") == v] for v in variants}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"Synthetic SFT data written by `{teacher}` with the sandlab recipe `{recipe}` (git {git_sha}). Each row is a "
             "prompt/completion conversation whose completion is the teacher's full reasoning trace ending in the final answer.",
             "The license follows the teacher model's terms of use.", "",
             "| variant | rows | mean completion words |", "|---|---|---|"]
    lines += [f"| {v} | {variants[v]} | {sum(words[v]) / len(words[v]):.0f} |" for v in sorted(variants)]
    lines += ["", "Fields: `id` (stable), `variant`, `prompt` (chat messages), `completion` (assistant message), `answer` "
              "(null for open-ended tasks), `source` (domain, branch, topic, teacher, agreement).", "",
              "```python", "import datasets", 'ds = datasets.load_dataset("json", data_files="train.jsonl", split="train")', "```", ""]
    if funnel:
        lines += ["## How it was filtered", "", *funnel_markdown(funnel), ""]
    lines += ["## Settings", "", "```yaml", yaml.safe_dump(settings, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def score_markdown(summary: dict[str, Any]) -> list[str]:
    """The score stage's summary (data/score.json) for report.md."""
    failed = ", ".join(f"{k}: {v}" for k, v in sorted(summary["failed_judgements"].items())) or "none"
    mean = "-" if summary["score_mean"] is None else f"{summary['score_mean']:.3f}"
    quartiles = ", ".join(f"{q:.3f}" for q in summary["score_quartiles"]) or "-"
    lines = [f"Scorer: {summary['scorer']}{' (' + summary['model'] + ')' if summary.get('model') else ''}; {summary['records_scored']} records, "
             f"{summary['candidates_scored']} responses scored; unusable scores dropped: {failed}; inputs cut to fit: {summary['inputs_cut']}.",
             f"Kept {summary['kept']}, mean score {mean}, quartiles {quartiles}.", ""]
    if summary["by_leaf"]:
        lines += ["| leaf | kept | mean score |", "|---|---|---|"]
        lines += [f"| {leaf} | {v['records']} | {v['score_mean']:.3f} |" for leaf, v in summary["by_leaf"].items()]
    return lines


def solve_markdown(summary: dict[str, Any], funnel: list[dict[str, Any]]) -> list[str]:
    """The solve stage's sampling (data/solve.json) for report.md, per problem the filter accepted."""
    k, n = summary["k"], summary["problems"]
    rounds = ", ".join(map(str, summary["round_sizes"]))
    lines = [f"{n} problems, k = {k}, {'adaptive rounds of ' + rounds if summary['adaptive'] else 'one round (fixed k)'}: "
             f"{summary['solutions_drawn']} of {k * n} solutions drawn; {summary['stopped_early']} problems stopped early, "
             f"{summary['solutions_skipped']} solutions (about {summary['completion_tokens_skipped_est']} tokens) skipped."]
    accepted = next((row["out"] for row in funnel if row["stage"] == "filter"), None)
    if accepted:
        fixed = summary["completion_tokens"] + summary["completion_tokens_skipped_est"]
        lines.append(f"Solve tokens per accepted problem: {summary['completion_tokens'] / accepted:.0f}"
                     + (f" (fixed k, estimated: {fixed / accepted:.0f}, {100 * (1 - summary['completion_tokens'] / fixed):.0f}% fewer with adaptive rounds)"
                        if summary["adaptive"] and fixed else "") + f"; {accepted} accepted.")
    return lines


def diversity_markdown(report: dict[str, Any]) -> list[str]:
    """The diversity stage's measures (data/diversity.json) for report.md."""
    distinct = ", ".join(f"{k} {v:.3f}" for k, v in report["distinct"].items())
    lines = [f"{report['records']} records; {distinct}."]
    cov, emb = report.get("coverage"), report.get("embedding")
    if cov:
        empty = [leaf for leaf, n in cov["per_leaf"].items() if not n]
        lines.append(f"Taxonomy coverage: {cov['leaves_hit']} of {cov['leaves_total']} leaves ({100 * cov['coverage']:.0f}%)"
                     + (f"; without records: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}" if empty else "")
                     + (f"; {cov['off_taxonomy']} records off the taxonomy" if cov["off_taxonomy"] else "") + ".")
    if emb:
        lines.append(f"Embedding spread: mean pairwise cosine distance {emb['mean_pairwise_distance']:.3f}, effective rank "
                     f"{emb['effective_rank']:.1f}; near-duplicates (cosine >= {emb['near_duplicate_threshold']}): {100 * emb['near_duplicate_rate']:.1f}%.")
    if report.get("capped"):
        lines.append(f"Capped per leaf: {report['capped']} records dropped.")
    return lines


def write_results(results: dict[str, dict[str, dict[str, Any]]], funnel: list[dict[str, Any]], run_dir: Path, title: str) -> str:
    """results[model][benchmark] = metrics. Writes results.csv and report.md; returns the markdown.
    data/solve.json, data/score.json and data/diversity.json, where the run has them, get their own sections."""
    benchmarks = sorted({b for per_model in results.values() for b in per_model})
    with open(run_dir / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "benchmark", "pass@1", "pass@1_std", "ci95_low", "ci95_high", "maj@k", "pass@k", "items", "samples",
                         "mean_output_tokens", "truncated_share", "no_answer_share"])
        for model, per_bench in results.items():
            for bench in benchmarks:
                m = per_bench.get(bench)
                if m:
                    lo, hi = m.get("pass@1_ci95", [None, None])
                    k = m.get("samples_per_item", 1)
                    writer.writerow([model, bench, f"{m['pass@1']:.2f}", f"{m.get('pass@1_std', 0.0):.2f}", _fmt(lo), _fmt(hi), _fmt(m.get(f"maj@{k}")),
                                     _fmt(m.get(f"pass@{k}")), m["items"], m["samples"], f"{m['mean_output_tokens']:.1f}", f"{m['truncated_share']:.3f}",
                                     f"{m['no_answer_share']:.3f}"])
    lines = [f"# {title}", ""]
    if funnel:
        lines += ["## Data funnel", "", *funnel_markdown(funnel), "", "![funnel](funnel.png)", ""]
        if (run_dir / "distributions.png").exists():
            lines += ["![distributions](distributions.png)", ""]
    data_dir = run_dir / "data"
    if (data_dir / "solve.json").exists():
        lines += ["## Solve", "", *solve_markdown(json.loads((data_dir / "solve.json").read_text()), funnel), ""]
    if (data_dir / "score.json").exists():
        lines += ["## Quality scores", "", *score_markdown(json.loads((data_dir / "score.json").read_text())), ""]
    if (data_dir / "diversity.json").exists():
        lines += ["## Diversity", "", *diversity_markdown(json.loads((data_dir / "diversity.json").read_text())), ""]
        if (data_dir / "diversity.png").exists():
            lines += ["![diversity](data/diversity.png)", ""]
    if results:
        lines += ["## Evaluation (pass@1 %, ± std across sample sets, [bootstrap 95% interval])", "", "| model | " + " | ".join(benchmarks) + " |",
                  "|---" * (len(benchmarks) + 1) + "|"]
        for model, per_bench in results.items():
            cells = [_pass_cell(per_bench[b]) if b in per_bench else "-" for b in benchmarks]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += _code_breakdown(results)
    text = "\n".join(lines) + "\n"
    (run_dir / "report.md").write_text(text)
    return text


def _code_breakdown(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Code benchmarks: pass@1 by difficulty and platform, sandbox failures, and whether code ran unsandboxed."""
    rows = []
    for model, per_bench in results.items():
        for bench, m in per_bench.items():
            if "infra_errors" not in m:
                continue
            groups = [f"{key.removeprefix('by_')} {value}: {g['pass@1']:.1f} ({g['items']})" for key in ("by_difficulty", "by_platform")
                      for value, g in m.get(key, {}).items()]
            notes = [f"{m['infra_errors']} sandbox failures not scored"] if m["infra_errors"] else []
            notes += [] if m.get("sandboxed", True) else ["UNSANDBOXED"]
            rows.append(f"| {model} | {bench} | {'; '.join(groups) or '-'} | {', '.join(notes) or '-'} |")
    if not rows:
        return []
    return ["", "## Code benchmarks (pass@1 % by group, items in brackets)", "", "| model | benchmark | breakdown | notes |", "|---|---|---|---|", *rows]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _pass_cell(m: dict[str, Any]) -> str:
    cell = f"{m['pass@1']:.1f}"
    if m.get("pass@1_std"):
        cell += f" ± {m['pass@1_std']:.1f}"
    if m.get("pass@1_ci95"):
        cell += f" [{m['pass@1_ci95'][0]:.1f}, {m['pass@1_ci95'][1]:.1f}]"
    return cell


def print_results(results: dict[str, dict[str, dict[str, Any]]], funnel: list[dict[str, Any]]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    if funnel:
        table = Table(title="Data funnel")
        for col in ("stage", "in", "out", "dropped", "reasons"):
            table.add_column(col)
        for row in funnel:
            table.add_row(row["stage"], str(row["in"]), str(row["out"]), str(row["dropped"]), ", ".join(f"{k}: {v}" for k, v in sorted(row["reasons"].items())))
        console.print(table)
    if results:
        benchmarks = sorted({b for per_model in results.values() for b in per_model})
        table = Table(title="Evaluation: pass@1 (%)", min_width=40)
        table.add_column("model")
        for b in benchmarks:
            table.add_column(b, justify="right")
        for model, per_bench in results.items():
            table.add_row(model, *[f"{per_bench[b]['pass@1']:.1f}" if b in per_bench else "-" for b in benchmarks])
        console.print(table)


def run_report(ctx: StageContext) -> dict[str, Any]:
    """report.md, results.csv, the funnel and distribution plots, the paper table and the W&B summary."""
    from sandlab.tracking import log_results  # noqa: PLC0415

    run_path, data_dir = ctx.run.path, ctx.data_dir
    funnel = ctx.funnel()
    results_path = run_path / "eval" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if funnel:
        plot_funnel(funnel, run_path / "funnel.png")
    final = data_dir / "export.jsonl"
    if final.exists():
        rated = {r["id"]: r.get("difficulty") for r in read_jsonl(data_dir / "difficulty.jsonl")} if (data_dir / "difficulty.jsonl").exists() else {}
        plot_distributions([{**r, "difficulty": rated.get(r["id"])} for r in read_jsonl(final)], run_path / "distributions.png")
    write_results(results, funnel, run_path, title=f"sandlab run: {ctx.cfg.recipe}")
    if ctx.cfg.eval.table and results:
        from sandlab.eval.tables import write_table  # noqa: PLC0415

        log.info("paper table: %s", write_table(ctx.cfg.eval.table, results, run_path / "tables"))
    print_results(results, funnel)
    log_results(results, funnel, throughput(funnel), run_path)
    log.info("report: %s", run_path / "report.md")
    return {"models": list(results), "stages": [row["stage"] for row in funnel]}


# The report is rewritten on every run (it reads whatever the run directory holds by then).
STAGE = Stage("report", Kind.REPORT, run_report)
