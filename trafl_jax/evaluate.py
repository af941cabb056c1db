"""Pass@k evaluation with diversity and locking diagnostics, across tasks and generation lengths.

  python -m trafl_jax.evaluate --config=configs/math.py --checkpoint=DIR [--checkpoint=DIR2 ...]

For each checkpoint x task x remasking x `gen_length` in the config's grid (`steps = gen_length *
steps_per_token`, `block_length`; low-confidence remasking, and others as rows of their own, labelled
`task[random]`): greedy accuracy; `n` samples per problem at the config's
temperature, scored for pass@k with the unbiased estimator `1 - C(n-c, k) / C(n, k)` at k = 1, 2, 4, ..., n;
and per problem the number of distinct correct final answers, distinct correct completions, and the entropy
of the commit step of each completion position across the samples (how spread the denoising paths are: a
locked model commits the same positions at the same steps every time).

Every finished batch of problems is appended to `<workdir>/eval_records.jsonl`; a restarted evaluation skips
what is recorded. At the end `eval.json`, `eval.md`, `passk.png` and `results.json` are written into the
workdir (`eval_report`; `python -m trafl_jax.report --eval_dir=DIR` rebuilds them from the records).

Dimension legend:  N: samples per problem    L: gen_length
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np

from trafl_jax import eval_report, jsonl, loop, metrics, sample, sampler, sharding
from trafl_jax import model as model_lib
from trafl_jax import tasks as tasks_lib

RECORDS_FILE = "eval_records.jsonl"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  tasks: tuple[str, ...]  # "task" or "task=path" (e.g. "math=/data/minerva_math/test.jsonl")
  # Each task is evaluated on each split, as rows of their own: "test" (held out) and, for Countdown,
  # "train" (a probe of the post-training prompts: where the policy trained is another claim).
  splits: tuple[str, ...]
  limit: int | None
  gen_lengths: tuple[int, ...]
  steps_per_token: float
  block_length: int
  # The sampler's remasking rules, each a row of its own: a model post-trained on random-remasking
  # rollouts (the trajectory estimator) is evaluated with the sampler it was trained under too.
  remasking: tuple[str, ...]
  num_samples: int
  temperature: float
  batch_size: int  # sampler rows per call
  problems_per_batch: int
  seed: int
  # The sampler's modes and draw settings (sampler.SECTION_FIELDS; empty: exact LLaDA). Rows not
  # sampled so are tagged.
  sampler: dict = dataclasses.field(default_factory=dict)
  countdown_numbers: int = 3  # how generated Countdown problems look (the data section's settings)
  countdown_max_number: int = 20

  def __post_init__(self):
    for remasking in self.remasking:  # the modes with each row's remasking: errors name the setting
      sampler.SamplerConfig(remasking=remasking, **self.sampler)

  def load(self, task: str, path: str | None, split: str = "test"):
    """The split's problems, without repeats (a problem that appears twice, by id or by prompt, is
    evaluated once: one problem is one point)."""
    kw = {}
    if task == "countdown":
      kw = dict(num_numbers=self.countdown_numbers, max_number=self.countdown_max_number)
    problems = tasks_lib.load(task, split=split, path=path, limit=self.limit, seed=self.seed, **kw)
    seen, out = set(), []
    for p in problems:
      if p.id not in seen and p.prompt not in seen:
        seen.update((p.id, p.prompt))
        out.append(p)
    return out

  def problem_sets(self) -> list[tuple[str, list]]:
    """`(row label, problems)` for every task x split: the task's label for "test", `label@split`
    for the others."""
    out = []
    for spec in self.tasks:
      task, path, label = _parse_task(spec)
      for split in self.splits:
        out.append((label if split == "test" else f"{label}@{split}", self.load(task, path, split)))
    return out

  def rows(self) -> list[tuple[str, list, str]]:
    """`(row label, problems, remasking)` for every task x split x remasking: exact low-confidence rows
    keep the task's label, the others are tagged with the remasking, the draw settings and the
    sampler's mode (`countdown[random]`, `countdown[dual+t0.9]`, `gsm8k[entropy,dream+p0.95]`)."""
    settings = sampler.SamplerConfig(**self.sampler)
    mode, draw = settings.mode, settings.draw_tag
    out = []
    for label, problems in self.problem_sets():
      for r in self.remasking:
        tags = [t for t in (r if r != "low_confidence" else "", draw, mode) if t and t != "exact"]
        out.append((f"{label}[{','.join(tags)}]" if tags else label, problems, r))
    return out


# ----------------------------------------------------------------------------------------------
# Estimators


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k, `1 - C(n-c, k) / C(n, k)`, as the numerically stable product."""
  if k > n or not 0 <= c <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ks_for(n: int) -> list[int]:
  ks = [2**i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []
  return ks + ([n] if ks and ks[-1] != n else [])


def commit_entropy(commit_steps_NxL: np.ndarray) -> float:
  """Mean over positions of the entropy (nats) of the step that committed it across the samples."""
  steps = np.asarray(commit_steps_NxL)
  if steps.shape[0] < 2:
    return 0.0
  total = 0.0
  for column in steps.T:
    counts = np.array(list(Counter(column.tolist()).values()), float)
    p = counts / counts.sum()
    total += float(-(p * np.log(p)).sum())
  return total / steps.shape[1]


def problem_record(
  greedy_reward: float,
  rewards: Sequence[float],
  answers: Sequence[str | None],
  completions: Sequence[str],
  commit_steps_NxL: np.ndarray,
) -> dict:
  """One problem's figures. `correct_answers` (the distinct correct answers, sorted, in extract_answer's
  canonical form) lets reports measure which answers a model finds (stats.solutions_found)."""
  correct = [r > 0 for r in rewards]
  correct_answers = sorted({a for a, ok in zip(answers, correct) if ok and a is not None})
  return {
    "greedy": float(greedy_reward),
    "n": len(rewards),
    "c": int(sum(correct)),
    "distinct_correct_answers": len(correct_answers),
    "distinct_correct_completions": len({t for t, ok in zip(completions, correct) if ok}),
    "commit_entropy": commit_entropy(commit_steps_NxL),
    "correct_answers": correct_answers,
  }


def summarize(records: Sequence[dict]) -> dict:
  """Means over problems: greedy accuracy, pass@k for every k, diversity and locking metrics."""
  if not records:
    return {}
  n = min(r["n"] for r in records)
  out = {"problems": len(records), "greedy": float(np.mean([r["greedy"] for r in records]))}
  for k in ks_for(n):
    out[f"pass@{k}"] = float(np.mean([pass_at_k(r["n"], r["c"], k) for r in records]))
  for key in ("distinct_correct_answers", "distinct_correct_completions", "commit_entropy"):
    out[key] = float(np.mean([r[key] for r in records]))
  out["all_wrong"] = float(np.mean([r["c"] == 0 for r in records]))
  out["all_right"] = float(np.mean([r["c"] == r["n"] for r in records]))
  return out


# ----------------------------------------------------------------------------------------------
# Running


def sampler_settings(cfg: EvalConfig, gen_length: int, remasking: str | None = None) -> dict:
  """`steps = gen_length * steps_per_token`, rounded to a whole number of steps per block; the
  remasking is the config's first unless given."""
  block = min(cfg.block_length, gen_length)
  blocks = gen_length // block
  steps = max(1, round(gen_length * cfg.steps_per_token / blocks)) * blocks
  return dict(
    gen_length=gen_length,
    steps=steps,
    block_length=block,
    remasking=remasking or cfg.remasking[0],
    batch_size=cfg.batch_size,
    **cfg.sampler,
  )


def _parse_task(spec: str) -> tuple[str, str | None, str]:
  name, _, path = spec.partition("=")
  label = name if not path else f"{name}:{os.path.splitext(os.path.basename(path))[0]}"
  return name, path or None, label


def _read_records(path: str) -> dict[tuple, dict]:
  done = {}
  if os.path.exists(path):
    # A line cut short by a kill (and what a restart appended to it) is skipped: that batch is redone.
    for _, r in jsonl.read(path, skip_corrupt=True):
      done[(r["checkpoint"], r["task"], r["gen_length"], r["id"])] = r
  return done


def evaluate_checkpoint(
  generator: sample.Generator,
  label: str,
  cfg: EvalConfig,
  workdir: str,
  progress: metrics.Progress | None = None,
) -> dict[tuple, dict]:
  """Evaluates one loaded checkpoint over the task x length grid, appending records as it goes."""
  records_path = os.path.join(workdir, RECORDS_FILE)
  done = _read_records(records_path)
  for task_label, problems, remasking in cfg.rows():
    for gen_length in cfg.gen_lengths:
      settings = sampler_settings(cfg, gen_length, remasking)
      for start in range(0, len(problems), cfg.problems_per_batch):
        batch = problems[start : start + cfg.problems_per_batch]
        keys = [(label, task_label, gen_length, p.id) for p in batch]
        if all(k in done for k in keys):
          if progress:
            progress.update(progress.step + len(batch))
          continue
        new = _evaluate_batch(generator, batch, settings, cfg, seed=cfg.seed * 1_000_003 + start)
        lines = []
        for key, record in zip(keys, new):
          record.update(checkpoint=key[0], task=key[1], gen_length=key[2], id=key[3])
          done[key] = record
          lines.append(json.dumps(record) + "\n")
        if jax.process_index() == 0:  # every process holds the same records; one writes them
          with open(records_path, "a", encoding="utf-8") as f:
            f.write("".join(lines))  # one write per batch: a kill loses at most this batch
        if progress:
          progress.update(progress.step + len(batch), {"pass@1": _running_pass1(done, label)})
  return done


def _running_pass1(done: dict, label: str) -> float:
  rs = [r for k, r in done.items() if k[0] == label]
  return float(np.mean([r["c"] / r["n"] for r in rs])) if rs else 0.0


def _evaluate_batch(generator, problems, settings, cfg: EvalConfig, seed: int) -> list[dict]:
  prompts = [tasks_lib.format_prompt(p) for p in problems]
  greedy = generator.generate(prompts, temperature=0.0, seed=seed, **settings)
  n = cfg.num_samples
  sampled = generator.generate(
    [p for p in prompts for _ in range(n)], temperature=cfg.temperature, seed=seed + 1, **settings
  )
  texts = [c.text for c in greedy] + [c.text for c in sampled]
  owners = list(problems) + [p for p in problems for _ in range(n)]
  rewards = tasks_lib.rewards_split(owners, texts)
  out = []
  for i, problem in enumerate(problems):
    rows = sampled[i * n : (i + 1) * n]
    row_rewards = rewards[len(problems) + i * n : len(problems) + (i + 1) * n]
    answers = [tasks_lib.extract_answer(problem, c.text) for c in rows]
    out.append(
      problem_record(
        rewards[i],
        row_rewards,
        answers,
        [c.text for c in rows],
        np.stack([c.commit_steps for c in rows]),
      )
    )
  return out


def run(
  cfg: EvalConfig,
  checkpoints: Sequence[str],
  workdir: str,
  labels: Sequence[str] = (),
  show_progress: bool = True,
  settings: model_lib.ModelSettings | None = None,
  layout: sharding.Layout | None = None,
  run_config: dict | None = None,
  target_beta: float | None = None,
) -> dict:
  """Evaluates every checkpoint and writes eval.json, eval.md, passk.png and results.json (with the
  statistics of `stats.analyze`); returns the summary.
  With `target_beta`, the checkpoint labelled "reference" is followed by the tilted target's pass@k at
  that beta (`target_summary`): the line TraFL should reach.
  Each checkpoint gives its model's shape; `settings` (a run's config: default, as stored) how it is
  computed, `layout` how it is sharded (default: data parallel over every device; an 8B model needs the
  run's FSDP split: replicated, its float32 parameters alone are 32 GB per device). `run_config` is
  recorded as `config.json` with each checkpoint's resolved model."""
  os.makedirs(workdir, exist_ok=True)
  labels = list(labels) or _labels(checkpoints)
  if len(labels) != len(checkpoints):
    raise ValueError(f"{len(labels)} labels for {len(checkpoints)} checkpoints")
  total = sum(len(problems) for _, problems, _ in cfg.rows())
  total *= len(cfg.gen_lengths) * len(checkpoints)
  progress = metrics.Progress(total, enabled=show_progress, desc="eval")
  done: dict[tuple, dict] = {}
  try:
    models = {}
    for checkpoint, label in zip(checkpoints, labels):
      generator = sample.Generator.load(checkpoint, settings=settings, layout=layout)
      models[label] = dataclasses.asdict(generator.cfg)
      if run_config is not None:
        loop.write_config(workdir, {**run_config, "models": models})
      done.update(evaluate_checkpoint(generator, label, cfg, workdir, progress))
  finally:
    progress.close()
  summary = _summaries(done, labels, target_beta)
  if jax.process_index() == 0:
    records = [r for key, r in done.items() if key[0] in labels]
    eval_report.write_reports(
      summary, workdir, dataclasses.asdict(cfg), records, target_beta, run_config=run_config
    )
  return summary


def _labels(checkpoints: Sequence[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(c)) for c in checkpoints]
  if len(set(names)) < len(names):
    names = [os.path.normpath(c) for c in checkpoints]
  return names


def target_summary(records: Sequence[dict], beta: float) -> dict:
  """pass@k of the tilted target `p_ref(y|x) exp(beta r) / Z(x)` TraFL trains toward, from the
  reference's per-problem counts: with `p = c / n` the reference's success rate on a problem, the target's
  is `p* = p e^beta / (p e^beta + 1 - p)`, and its pass@k `1 - (1 - p*)^k` (a plug-in estimate: a problem
  the reference never solved stays at 0), averaged over problems at the reference's k."""
  n = min(r["n"] for r in records)
  p = np.array([r["c"] / r["n"] for r in records], np.float64)
  tilted = p * math.exp(beta) / (p * math.exp(beta) + 1.0 - p)
  out = {"problems": len(records), "target": True, "beta": beta}
  for k in ks_for(n):
    out[f"pass@{k}"] = float(np.mean(1.0 - (1.0 - tilted) ** k))
  return out


def _summaries(
  done: dict[tuple, dict],
  labels: Sequence[str],
  target_beta: float | None = None,
  reference_label: str = "reference",
) -> dict:
  """Summary rows per (checkpoint, task, length); with `target_beta` and a checkpoint labelled
  `reference_label`, each of its rows is followed by the tilted target's (`target_summary`)."""
  grouped: dict[tuple, list] = {}
  for (label, task, gen_length, _), record in done.items():
    if label in labels:
      grouped.setdefault((label, task, gen_length), []).append(record)
  results = []
  for (label, task, gen_length), records in sorted(
    grouped.items(), key=lambda kv: (kv[0][1], kv[0][2], list(labels).index(kv[0][0]))
  ):
    results.append(
      {"checkpoint": label, "task": task, "gen_length": gen_length, **summarize(records)}
    )
    if target_beta is not None and label == reference_label:
      name = f"target (beta={target_beta:g})"
      row = {"checkpoint": name, "task": task, "gen_length": gen_length}
      results.append({**row, **target_summary(records, target_beta)})
  return {"results": results}


def main(argv) -> None:
  del argv
  import sys

  from absl import flags

  from trafl_jax import checkpoint, cli, config_lib

  cli.quiet_libraries()
  f = flags.FLAGS
  config = cli.load_config(f["config"])
  workdir = f.workdir or cli.default_workdir(f["config"].config_filename, prefix="eval_")
  try:
    summary = run(
      config_lib.eval_config(config),
      f.checkpoint,
      workdir,
      f.label or (),
      settings=config_lib.model_settings(config),
      layout=config_lib.layout(config),
      run_config=config_lib.record(config),
      target_beta=config.rl.beta,
    )
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(eval_report.markdown(summary))
  print(f"wrote {workdir}/eval.json, eval.md, passk.png, results.json")


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]); its eval section.")
  flags.DEFINE_multi_string("checkpoint", None, "Checkpoint to evaluate (repeatable).")
  flags.DEFINE_multi_string("label", None, "Names for the checkpoints in tables (default: dirs).")
  flags.DEFINE_string("workdir", None, "Where records and reports go (default runs/eval_<config>).")
  flags.mark_flags_as_required(["config", "checkpoint"])


if __name__ == "__main__":
  from absl import app

  from trafl_jax import cli

  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
