"""The one loop scaffold every training loop uses (reference SFT in train.py, post-training in
posttrain.py): resume from the latest checkpoint, the metric writer and progress bar, SIGTERM -> save and
stop, periodic and final checkpoints, and the closing of all of it however the loop ends.

A loop body is `step_fn(state, step) -> (state, pending)`: `step` is the step being taken (0-based) and
`pending` what it produced for the host; `read(step, pending)` turns it into flat host metrics. Reads
happen one step late (the device runs the next step while the host reads the last), and always before a
checkpoint, so a checkpoint's step has its metrics written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging

from trafl_jax import checkpoint as ckpt_lib
from trafl_jax import metrics, sharding

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  num_steps: int
  ckpt_every: int
  log_every: int
  keep_checkpoints: int
  progress: bool = True
  desc: str = ""  # the progress bar's label
  stage: str = "training"  # what the log calls it
  # Metrics shown on the progress bar and in the periodic log line: (label, metric key).
  shown: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    for key in ("num_steps", "log_every", "ckpt_every", "keep_checkpoints"):
      if getattr(self, key) <= 0:
        raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


def write_config(workdir: str, run_config: Mapping[str, Any]) -> None:
  """`<workdir>/config.json`: the config a stage actually ran with (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(run_config, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def with_model(run_config: Mapping[str, Any], model_cfg) -> dict:
  """The run config with the model a stage actually built: the checkpoint's shape merged with the
  config's compute settings (the config's `preset` name kept)."""
  model = dict(run_config.get("model", {}))
  fields = dataclasses.asdict(model_cfg)
  if not model_cfg.lora_rank:  # a model without adapters records none (as before they existed)
    fields = {k: v for k, v in fields.items() if not k.startswith("lora_")}
  model.update({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()})  # as JSON
  return {**run_config, "model": model}


class Loop:
  """Checkpointer, writer and progress of one training directory. `restore` first, then `run`."""

  def __init__(self, workdir: str, cfg: LoopConfig, run_config: Mapping[str, Any]):
    self.workdir = os.path.abspath(workdir)
    self.cfg = cfg
    self.run_config = dict(run_config)
    self.checkpointer = ckpt_lib.Checkpointer(self.workdir, cfg.keep_checkpoints)
    self.writer: metrics.MetricWriter | None = None

  def restore(self, state, iterator=None):
    """`(state, iterator)` from the latest checkpoint, or the given ones when there is none."""
    latest = self.checkpointer.latest_step()
    if latest is None:
      return state, iterator
    logging.info("resuming %s from %s/%d", self.cfg.stage, self.checkpointer.directory, latest)
    restored, iterator = self.checkpointer.restore(
      latest, sharding.abstract(state), iterator, self.run_config
    )
    # What the checkpoint does not hold (a lora run's frozen base) is the given state's.
    restored = jax.tree.map(
      lambda r, s: s if isinstance(r, jax.ShapeDtypeStruct) else r, restored, state
    )
    return restored, iterator

  def run(
    self,
    state,
    step_fn: Callable[[Any, int], tuple[Any, Any]],
    read: Callable[[int, Any], dict[str, float]],
    max_steps: int | None = None,
    iterator=None,
  ):
    """Steps from the state's step to `num_steps` (at most `max_steps` this call); returns
    `(state, last host metrics)`."""
    cfg, is_main = self.cfg, jax.process_index() == 0
    start = int(jax.device_get(state.step))
    end = cfg.num_steps if max_steps is None else min(cfg.num_steps, start + max_steps)
    self.writer = metrics.MetricWriter(self.workdir, enabled=is_main, resume_step=start or None)
    progress = metrics.Progress(
      cfg.num_steps, initial_step=start, enabled=is_main and cfg.progress, desc=cfg.desc
    )
    last: dict[str, float] = {}
    pending = None

    def flush():
      nonlocal pending, last
      step, value = pending
      pending = None
      host = read(step, value)
      metrics.check_finite(step, host)
      self.writer.write_scalars(step, host)
      shown = {label: host[key] for label, key in cfg.shown if key in host}
      progress.update(step, shown)
      if step % cfg.log_every == 0 or step == cfg.num_steps:
        logging.info(
          "step %d: %s", step, " ".join(f"{label} {v:.4f}" for label, v in shown.items())
        )
      last = host

    step = start
    try:
      with ckpt_lib.PreemptionHandler() as preemption:
        while step < end:
          state, value = step_fn(state, step)
          if pending is not None:
            flush()
          step += 1
          pending = (step, value)
          stop = preemption.requested()
          if step % cfg.ckpt_every == 0 or step == end or stop:
            flush()
            self.checkpointer.save(step, state, iterator, self.run_config)
          if stop:
            logging.warning("stopped by SIGTERM at step %d; checkpoint saved", step)
            break
        if pending is not None:
          flush()
    finally:
      self.checkpointer.wait()
      self.checkpointer.close()
      progress.close()
      self.writer.close()
    return state, last
