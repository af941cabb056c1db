"""Host-side metric sinks: JSON lines + TensorBoard, non-finite guard, console progress.

Metrics are flat dicts of scalars keyed like `train/loss`, produced by jitted steps and read on
the host one step late. Only process 0 should write; every other process builds its sinks with
`enabled=False`, which makes them no-ops, so call sites need no `if process_index == 0` guards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import tensorboardX
import tqdm

from trafl_jax import jsonl

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"

_log = logging.getLogger(__name__)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  """Parses a JSON-lines file, dropping (with a warning) lines a killed run left half-written."""
  if not os.path.exists(path):
    return []
  records = []
  for where, record in jsonl.read(path, skip_corrupt=True):
    if not isinstance(record.get("step"), int):
      _log.warning("Dropping %s: no integer step", where)
      continue
    records.append(record)
  return records


def _truncate_jsonl(path: str, max_step: int) -> None:
  """Keeps only records with step <= max_step; the temp file + os.replace keeps it crash-safe."""
  if not os.path.exists(path):
    return
  kept = [r for r in _read_jsonl(path) if r["step"] <= max_step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for record in kept:
      f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _open_append(path: str):
  f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 -- lives as long as the writer.
  # A kill mid-write can leave a line without its newline; terminate it so the next record is not
  # glued onto it (the fragment is then dropped as corrupt on read, not our new line).
  if f.tell() > 0:
    f.seek(f.tell() - 1)
    last = f.read(1)
    f.seek(0, os.SEEK_END)
    if last != "\n":
      f.write("\n")
  return f


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Loads `<workdir>/metrics.jsonl` as a list of `{"step": int, **scalars}` dicts."""
  return _read_jsonl(os.path.join(workdir, METRICS_FILE))


class MetricWriter:
  """Writes scalar dicts to `<workdir>/metrics.jsonl` and TensorBoard under `<workdir>/tensorboard`.

  With `resume_step=k`, records with step > k (written by a killed run after its last checkpoint)
  are removed from the JSON-lines files and TensorBoard is told to purge events after k, so the
  logs read as one clean run.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.workdir = workdir
    self.enabled = enabled
    self._metrics_file = None
    self._samples_file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    samples_path = os.path.join(workdir, SAMPLES_FILE)
    if resume_step is not None:
      _truncate_jsonl(metrics_path, resume_step)
      _truncate_jsonl(samples_path, resume_step)
    self._metrics_file = _open_append(metrics_path)
    self._samples_path = samples_path
    self._tb = tensorboardX.SummaryWriter(
      os.path.join(workdir, TENSORBOARD_DIR),
      purge_step=None if resume_step is None else resume_step + 1,
    )

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Records `scalars` (floats, numpy or jax scalars) at `step`."""
    if not self.enabled:
      return
    if "step" in scalars:
      raise ValueError("'step' is reserved in metrics.jsonl; rename the scalar")
    step = int(step)
    values = {k: float(v) for k, v in scalars.items()}
    self._metrics_file.write(json.dumps({"step": step, **values}) + "\n")
    # Flushed per write so that a killed run keeps everything it logged.
    self._metrics_file.flush()
    for key, value in values.items():
      self._tb.add_scalar(key, value, global_step=step)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Records text (e.g. decoded samples) to TensorBoard and `<workdir>/samples.jsonl`."""
    if not self.enabled:
      return
    step = int(step)
    texts = {k: str(v) for k, v in texts.items()}
    if self._samples_file is None:  # Opened lazily so runs without samples get no empty file.
      self._samples_file = _open_append(self._samples_path)
    self._samples_file.write(json.dumps({"step": step, "texts": texts}) + "\n")
    self._samples_file.flush()
    for key, text in texts.items():
      self._tb.add_text(key, text, global_step=step)

  def flush(self) -> None:
    if not self.enabled:
      return
    for f in (self._metrics_file, self._samples_file):
      if f is not None and not f.closed:
        f.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    for f in (self._metrics_file, self._samples_file):
      if f is not None and not f.closed:
        f.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def check_finite(step: int, scalars: Mapping[str, Any]) -> None:
  """Raises FloatingPointError naming `step` and every non-finite scalar."""
  bad = {k: float(v) for k, v in scalars.items() if not math.isfinite(float(v))}
  if bad:
    listing = ", ".join(f"{k}={v}" for k, v in bad.items())
    raise FloatingPointError(
      f"non-finite {listing} at step {step}; stopping rather than training on a diverged state"
    )


def _short_key(key: str, all_keys: list[str]) -> str:
  tail = key.rsplit("/", 1)[-1]
  # Keep the full key when two metrics share a tail (train/loss vs eval/loss).
  return tail if sum(k.rsplit("/", 1)[-1] == tail for k in all_keys) == 1 else key


class Progress:
  """Console progress bar on stderr. Steps are absolute; ETA counts only this run's steps."""

  def __init__(
    self, total_steps: int, initial_step: int = 0, enabled: bool = True, desc: str = "train"
  ):
    self.enabled = enabled
    self._bar = None
    if not enabled:
      return
    # Piped stderr (cluster logs) gets rare refreshes instead of a line every 0.1s.
    interactive = sys.stderr.isatty()
    # tqdm's `initial` keeps resumed steps out of the rate, hence out of the ETA.
    self._bar = tqdm.tqdm(
      total=total_steps,
      initial=initial_step,
      desc=desc,
      file=sys.stderr,
      dynamic_ncols=True,
      mininterval=0.1 if interactive else 30.0,
      unit="step",
    )

  @property
  def step(self) -> int:
    return 0 if self._bar is None else int(self._bar.n)

  def update(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
    """Moves the bar to absolute `step`, optionally showing short `postfix` values."""
    if self._bar is None:
      return
    if postfix:
      keys = list(postfix)
      self._bar.set_postfix(
        {_short_key(k, keys): f"{float(v):.4g}" for k, v in postfix.items()}, refresh=False
      )
    self._bar.update(int(step) - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class StepRate:
  """Steps per second between successive `__call__`s, e.g. for a `train/steps_per_sec` scalar."""

  def __init__(self, step: int = 0):
    self._step = step
    self._time = time.perf_counter()

  def __call__(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return rate
