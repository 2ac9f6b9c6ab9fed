"""The paper's result tables: rows = models, columns = AIME24, AIME25, MATH500, GPQA-Diamond, with the
published number beside each measured one, the difference, and whether the published number lies in
the measured bootstrap 95% interval. Writes <table>.md, <table>.csv and <table>.png."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

from sandlab.errors import ConfigError

PUBLISHED = Path(__file__).resolve().parents[3] / "eval" / "published.yaml"
LABELS = {"aime24": "AIME24", "aime25": "AIME25", "math500": "MATH500", "gpqa_diamond": "GPQA", "livecodebench": "LiveCodeBench",
          "humaneval": "HumanEval"}


def table_benchmarks(table: str, published: dict[str, Any]) -> list[str]:
    """A table's columns: its own ``benchmarks`` (AM-Thinking's code column), else the file's."""
    return list(published["tables"][table].get("benchmarks") or published["benchmarks"])


def load_published(path: Path = PUBLISHED) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"published results file {path} does not exist")
    return yaml.safe_load(path.read_text())


def table_rows(table: str, measured: dict[str, dict[str, dict[str, Any]]], published: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model: the published rows in paper order, then measured models the paper lacks."""
    if table not in published["tables"]:
        raise ConfigError(f"eval.table={table!r} is not one of {sorted(published['tables'])}")
    rows = []
    paper_rows = {r["model"]: r for r in published["tables"][table]["rows"]}
    for name in [*paper_rows, *(m for m in measured if m not in paper_rows)]:
        row: dict[str, Any] = {"model": name}
        for bench in table_benchmarks(table, published):
            paper = paper_rows.get(name, {}).get(bench)
            got = measured.get(name, {}).get(bench)
            value = got["pass@1"] if got else None
            lo, hi = got.get("pass@1_ci95", [None, None]) if got else (None, None)
            row[bench] = {"published": paper, "measured": value, "ci95": [lo, hi] if got else None,
                          "diff": (value - paper) if value is not None and paper is not None else None,
                          "inside_ci": (lo <= paper <= hi) if got and paper is not None and lo is not None else None}
        rows.append(row)
    return rows


def _cell(c: dict[str, Any]) -> str:
    if c["measured"] is None:
        return f"- ({c['published']})" if c["published"] is not None else "-"
    text = f"{c['measured']:.1f}"
    if c["published"] is not None:
        text += f" ({c['published']}, {c['diff']:+.1f}{', in CI' if c['inside_ci'] else ', outside CI'})"
    return text


def write_table(table: str, measured: dict[str, dict[str, dict[str, Any]]], out_dir: Path, published: dict[str, Any] | None = None) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    published = published or load_published()
    protocols = sorted({str(m.get("protocol")) for per_bench in measured.values() for m in per_bench.values()})
    if len(protocols) > 1:  # never mix protocols silently
        raise ConfigError(f"measured results come from several protocols {protocols}; tabulate one protocol at a time")
    rows = table_rows(table, measured, published)
    benches = table_benchmarks(table, published)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = published["tables"][table]
    title = spec["title"]
    protocol = protocols[0] if protocols else "none"
    lines = [f"# {title}", "", f"Measured pass@1 with the `{protocol}` protocol (published, difference, whether the published value lies in the "
             f"measured bootstrap 95% interval). Published numbers: {spec.get('source', published['source'])}; they use the "
             f"`{spec.get('protocol', 'paper')}` protocol.", "",
             "| model | " + " | ".join(LABELS.get(b, b) for b in benches) + " |", "|---" * (len(benches) + 1) + "|"]
    lines += [f"| {r['model']} | " + " | ".join(_cell(r[b]) for b in benches) + " |" for r in rows]
    (out_dir / f"{table}.md").write_text("\n".join(lines) + "\n")
    with open(out_dir / f"{table}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "benchmark", "measured", "ci95_low", "ci95_high", "published", "diff", "inside_ci"])
        for r in rows:
            for b in benches:
                c = r[b]
                writer.writerow([r["model"], b, c["measured"], *(c["ci95"] or [None, None]), c["published"], c["diff"], c["inside_ci"]])
    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 0.45 * len(rows) + 1.8), sharey=True)
    for ax, b in zip(axes, benches):
        names = [r["model"] for r in rows][::-1]
        pub = [r[b]["published"] or 0 for r in rows][::-1]
        got = [r[b]["measured"] or 0 for r in rows][::-1]
        y = range(len(names))
        ax.barh([i + 0.2 for i in y], pub, height=0.4, color="#BBBBBB", label="published")
        ax.barh([i - 0.2 for i in y], got, height=0.4, color="#4C72B0", label="measured")
        ax.set_yticks(list(y), names)
        ax.set_title(LABELS.get(b, b))
        ax.set_xlim(0, 100)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_dir / f"{table}.png", dpi=120)
    plt.close(fig)
    return out_dir / f"{table}.md"
