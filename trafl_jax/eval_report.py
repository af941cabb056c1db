"""Evaluation reports: `eval.json`, `eval.md` (Markdown tables), `passk.png` and `results.json`.

`python -m trafl_jax.report --eval_dir=DIR` rebuilds every report of an evaluation directory from its
`eval_records.jsonl`, sampling nothing (trafl_jax/report.py).

With the per-problem records, the reports carry `stats.analyze`'s figures: pass@k with 95% bootstrap
intervals over problems, the paired difference against the reference, coverage apart from distinct
answers per solved problem, Countdown solutions found, and difficulty buckets. `passk.png` then has one
colour per model group (a label's prefix before `/s<seed>`): the mean over seeds as a line, the bootstrap
interval of that mean as a band (problems resampled, the seeds averaged per problem: the spread of one
seed's training is in `results.json`'s `per_seed`), the tilted target dashed; under each task x length
panel, pass@k minus the reference's, paired per problem, with its band and the zero line.
`results.json` holds every figure for k = 1..n, the settings and the code's commit.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from trafl_jax import stats  # noqa: E402

_DIVERSITY = (
  ("distinct_correct_answers", "distinct correct answers"),
  ("distinct_correct_completions", "distinct correct completions"),
  ("commit_entropy", "commit-step entropy"),
  ("all_wrong", "all-wrong problems"),
)
RESULTS_FILE = "results.json"


def _ks(row: Mapping) -> list[int]:
  return sorted(int(k[len("pass@") :]) for k in row if k.startswith("pass@"))


def _cell(row: Mapping, key: str, digits: int) -> str:
  """A table cell; "-" where the row has no such figure (the target row has only pass@k)."""
  return f"{row[key]:.{digits}f}" if key in row else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(cells) + " |" for cells in rows] + [""]


def markdown(summary: Mapping, analysis: Mapping | None = None) -> str:
  """Per task x length, every checkpoint's means; with `analysis`, its interval tables after them."""
  rows = summary["results"]
  lines = ["# Evaluation", ""]
  for task in dict.fromkeys(r["task"] for r in rows):
    for gen_length in dict.fromkeys(r["gen_length"] for r in rows if r["task"] == task):
      group = [r for r in rows if r["task"] == task and r["gen_length"] == gen_length]
      ks = _ks(group[0])
      lines += [f"## {task}, gen_length {gen_length} ({group[0]['problems']} problems)", ""]
      header = ["checkpoint", "greedy"] + [f"pass@{k}" for k in ks] + [t for _, t in _DIVERSITY]
      cells = []
      for r in group:
        cells.append(
          [r["checkpoint"], _cell(r, "greedy", 3)]
          + [_cell(r, f"pass@{k}", 3) for k in ks]
          + [_cell(r, key, 2) for key, _ in _DIVERSITY]
        )
      lines += _table(header, cells)
  if analysis:
    lines += statistics_markdown(analysis)
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Interval tables


def key_ks(k_max: int) -> list[int]:
  """The k shown in tables: 1, 4, 16, ... up to n, and n."""
  ks = [4**i for i in range(10) if 4**i <= k_max]
  return ks + ([k_max] if ks[-1] != k_max else [])


def _ci(figure: Mapping | None, i: int | None = None, sign: bool = False) -> str:
  """`mean [lo, hi]` of an interval (its i-th entry for a per-k one); "-" where there is none."""
  if not figure or figure["mean"] is None:
    return "-"
  pick = (lambda x: x) if i is None else (lambda x: x[i])
  mean, lo, hi = (pick(figure[key]) for key in ("mean", "lo", "hi"))
  form = "+.3f" if sign else ".3f"
  return f"{mean:{form}} [{lo:{form}}, {hi:{form}}]"


def statistics_markdown(analysis: Mapping) -> list[str]:
  """Per row: pass@k and sample figures with intervals, the paired difference against the reference,
  and pass@1 / pass@n by the reference's difficulty."""
  method = analysis["method"]
  lines = [
    "# Intervals",
    "",
    f"Mean [{method['level']:.0%} interval]: {method['interval']} ({method['resamples']} resamples); "
    "a model's seeds are averaged per problem first. Coverage: problems solved by some sample; distinct "
    "answers and solutions found: per solved problem. Buckets: by the reference's own success rate on "
    "the problem, so its row there is selected on the same samples (read it as a floor / ceiling).",
    "",
  ]
  for row in analysis["rows"]:
    ks, models = key_ks(row["k"][-1]), row["models"]
    title = f"{row['task']}, gen_length {row['gen_length']} ({row['problems']} problems)"
    lines += [f"## Intervals: {title}", ""]
    header = ["model", "seeds"] + [f"pass@{k}" for k in ks]
    header += ["coverage", "distinct answers / solved", "solutions found / solved", "greedy"]
    cells = []
    for m in models:
      cells.append(
        [m["name"], str(m.get("seeds", "-"))]
        + [_ci(m["pass@k"], k - 1) for k in ks]
        + [
          _ci(m.get(key))
          for key in ("coverage", "distinct_per_solved", "solutions_found", "greedy")
        ]
      )
    lines += _table(header, cells)
    paired = [m for m in models if "diff_vs_reference" in m]
    if paired:
      lines += [f"Paired difference against the reference, {title}:", ""]
      header = ["model"] + [f"Δ pass@{k}" for k in ks] + ["sign flips at k"]
      cells = [
        [m["name"]]
        + [_ci(m["diff_vs_reference"], k - 1, sign=True) for k in ks]
        + [str(m.get("crossover_k") or "-")]
        for m in paired
      ]
      lines += _table(header, cells)
    if models and "buckets" in models[0]:
      n = row["k"][-1]
      lines += [f"pass@1 / pass@{n} by the reference's success rate c/n, {title}:", ""]
      header = ["reference c/n", "problems"] + [m["name"] for m in models]
      cells = []
      for bucket, figures in models[0]["buckets"].items():
        cells.append(
          [bucket, str(figures["problems"])]
          + [
            f"{m['buckets'][bucket]['pass@1']:.3f} / {m['buckets'][bucket][f'pass@{n}']:.3f}"
            for m in models
          ]
        )
      lines += _table(header, cells)
  return lines


# ----------------------------------------------------------------------------------------------
# Plots


def plot(summary: Mapping, path: str, analysis: Mapping | None = None) -> None:
  """`passk.png`: per model group with intervals when there is an `analysis`, else a line per row."""
  if analysis and analysis["rows"]:
    return plot_groups(analysis, path)
  rows = summary["results"]
  panels = list(dict.fromkeys((r["task"], r["gen_length"]) for r in rows))
  cols = min(3, len(panels)) or 1
  nrows = -(-len(panels) // cols) or 1
  fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
  for ax, (task, gen_length) in zip(axes.flat, panels):
    for r in (r for r in rows if r["task"] == task and r["gen_length"] == gen_length):
      ks = _ks(r)
      style = dict(linestyle="--", color="gray") if r.get("target") else dict(marker="o")
      ax.plot(ks, [r[f"pass@{k}"] for k in ks], label=r["checkpoint"], **style)
    _axes(ax, f"{task}, length {gen_length}", "pass@k")
    ax.set_ylim(0, 1)
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _axes(ax, title: str, ylabel: str) -> None:
  ax.set_xscale("log", base=2)
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))  # 16, not 2^4
  ax.set_xlabel("k")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)


def _styles(analysis: Mapping) -> dict[str, dict]:
  """One style per model group, the same in every panel: the reference black, the target grey dashed."""
  names = dict.fromkeys(m["name"] for row in analysis["rows"] for m in row["models"])
  palette = iter(plt.get_cmap("tab10").colors)
  styles = {}
  for name in names:
    if name == stats.REFERENCE:
      styles[name] = dict(color="black")
    elif name.startswith("target"):
      styles[name] = dict(color="gray", linestyle="--")
    else:
      styles[name] = dict(color=next(palette, "tab:olive"))
  return styles


def plot_groups(analysis: Mapping, path: str) -> None:
  """Per task x length: pass@k per group with its band above, pass@k minus the reference's below."""
  rows, styles = analysis["rows"], _styles(analysis)
  paired = any("diff_vs_reference" in m for row in rows for m in row["models"])
  fig, axes = plt.subplots(1 + paired, len(rows), figsize=(4.5 * len(rows), 3.5 * (1 + paired)))
  axes = np.asarray(axes).reshape(1 + paired, len(rows))
  for col, row in enumerate(rows):
    ks, title = row["k"], f"{row['task']}, length {row['gen_length']}"
    for m in row["models"]:
      _line(axes[0, col], ks, m["pass@k"], m["name"], styles[m["name"]])
      if "diff_vs_reference" in m:
        _line(axes[1, col], ks, m["diff_vs_reference"], m["name"], styles[m["name"]])
    axes[0, col].set_ylim(0, 1)
    _axes(axes[0, col], title, "pass@k")
    if paired:
      axes[1, col].axhline(0.0, color="black", linewidth=0.8)
      _axes(axes[1, col], title, "pass@k − reference (paired)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _line(ax, ks: Sequence[int], figure: Mapping, name: str, style: Mapping) -> None:
  ax.plot(ks, figure["mean"], label=name, **style)
  ax.fill_between(ks, figure["lo"], figure["hi"], color=style["color"], alpha=0.15, linewidth=0)


# ----------------------------------------------------------------------------------------------
# Files


def git_commit() -> str:
  """The code's commit (`-dirty` with uncommitted changes to tracked files), or "unknown"."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    git = lambda *a: subprocess.run(
      ["git", "-C", here, *a], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    commit = git("rev-parse", "HEAD")
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def results(analysis: Mapping, settings: Mapping, commit: str) -> dict:
  """`results.json`: per row (task, its split, gen_length) and model group, every figure of
  `stats.analyze` for k = 1..n, with the settings and commit of the run."""
  out_rows = []
  for row in analysis["rows"]:
    split = row["task"].partition("@")[2] or "test"
    out_rows.append({**row, "split": split, "models": {m["name"]: m for m in row["models"]}})
  return {
    "commit": commit,
    "settings": dict(settings),
    "method": analysis["method"],
    "rows": out_rows,
  }


def write_reports(
  summary: Mapping,
  workdir: str,
  config: Mapping,
  records: Sequence[Mapping] = (),
  target_beta: float | None = None,
  run_config: Mapping | None = None,
  commit: str | None = None,
  extra_settings: Mapping | None = None,
) -> dict | None:
  """eval.json, eval.md, passk.png; with the per-problem `records`, their statistics too and
  results.json (settings: the eval config, the run config, `extra_settings`); returns the statistics
  (`stats.analyze`) or None. `commit` defaults to the code's."""
  commit = commit or git_commit()
  analysis = stats.analyze(records, target_beta) if records else None
  with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
    json.dump({"config": dict(config), "commit": commit, **summary}, f, indent=2)
  with open(os.path.join(workdir, "eval.md"), "w", encoding="utf-8") as f:
    f.write(markdown(summary, analysis))
  if summary["results"]:
    plot(summary, os.path.join(workdir, "passk.png"), analysis)
  if analysis is not None:
    settings = {"eval": dict(config), "run": run_config, **(extra_settings or {})}
    doc = results(analysis, settings, commit)
    write_json(doc, os.path.join(workdir, RESULTS_FILE))
  return analysis


def write_json(doc: Mapping, path: str) -> None:
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")


def _load(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
