"""Evaluation reports: `eval.json`, `eval.md` (Markdown tables) and `passk.png` (pass@k vs k)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
from matplotlib import pyplot as plt  # noqa: E402

_DIVERSITY = (
  ("distinct_correct_answers", "distinct correct answers"),
  ("distinct_correct_completions", "distinct correct completions"),
  ("commit_entropy", "commit-step entropy"),
  ("all_wrong", "all-wrong problems"),
)


def _ks(row: Mapping) -> list[int]:
  return sorted(int(k[len("pass@") :]) for k in row if k.startswith("pass@"))


def _cell(row: Mapping, key: str, digits: int) -> str:
  """A table cell; "-" where the row has no such figure (the target row has only pass@k)."""
  return f"{row[key]:.{digits}f}" if key in row else "-"


def markdown(summary: Mapping) -> str:
  rows = summary["results"]
  lines = ["# Evaluation", ""]
  for task in dict.fromkeys(r["task"] for r in rows):
    for gen_length in dict.fromkeys(r["gen_length"] for r in rows if r["task"] == task):
      group = [r for r in rows if r["task"] == task and r["gen_length"] == gen_length]
      ks = _ks(group[0])
      lines += [f"## {task}, gen_length {gen_length} ({group[0]['problems']} problems)", ""]
      header = ["checkpoint", "greedy"] + [f"pass@{k}" for k in ks] + [t for _, t in _DIVERSITY]
      lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
      for r in group:
        cells = [r["checkpoint"], _cell(r, "greedy", 3)] + [_cell(r, f"pass@{k}", 3) for k in ks]
        cells += [_cell(r, key, 2) for key, _ in _DIVERSITY]
        lines.append("| " + " | ".join(cells) + " |")
      lines.append("")
  return "\n".join(lines)


def plot(summary: Mapping, path: str) -> None:
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
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title(f"{task}, length {gen_length}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_reports(summary: Mapping, workdir: str, config: Mapping) -> None:
  with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
    json.dump({"config": dict(config), **summary}, f, indent=2)
  with open(os.path.join(workdir, "eval.md"), "w", encoding="utf-8") as f:
    f.write(markdown(summary))
  if summary["results"]:
    plot(summary, os.path.join(workdir, "passk.png"))
