"""Orbax checkpoints: save and resume, the resume order, params-only starts, preemption.

A checkpoint step directory holds four items:
  params       the model parameters (also what `init_checkpoint` and model export read)
  train_state  step, optimizer state, RNG key
  data         the grain iterator state, one JSON file per process
  config       the run's config as JSON

Resume order: (1) the latest step in `<workdir>/checkpoints`, (2) `init_checkpoint` (params only), (3) a fresh
init. A failed start never deletes or overwrites an existing checkpoint: every check happens before the
first save.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from trafl_jax import hf_format, sharding

# What must match for a checkpoint to be resumed: a changed model cannot load the state, and a changed
# data pipeline would silently replay the wrong batches from the saved iterator position.
# (section, None = every field except the compute-only ones below | the fields that must match)
_MUST_MATCH = (
  ("model", None),
  (
    "data",
    (
      "source",
      "train_path",
      "prompt_key",
      "answer_key",
      "num_generated",
      "prompt_len",
      "answer_len",
      "batch_size",
      "shuffle",
    ),
  ),
)
# Model fields that may differ on resume: they change compute, not the stored arrays.
_MAY_DIFFER = ("dtype", "remat", "scan_layers", "logits_chunk")


class CheckpointError(RuntimeError):
  pass


def _abs(path: str) -> str:
  if "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


class Checkpointer:
  """Saves and restores the full training state of a run in `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(_abs(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    handlers = {
      "params": ocp.StandardCheckpointHandler(),
      "train_state": ocp.StandardCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(
    self, step: int, state, iterator, config: Mapping[str, Any], force: bool = False
  ) -> None:
    """`state` has `checkpoint_params()` (the parameters a run trains) and `checkpoint_tree()`
    (everything else that resumes); `iterator` is a grain iterator or None (a run whose data position
    is a function of the step)."""
    items = dict(
      params=ocp.args.StandardSave(state.checkpoint_params()),
      train_state=ocp.args.StandardSave(state.checkpoint_tree()),
      config=ocp.args.JsonSave(dict(config)),
    )
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def saved_config(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def restore(self, step: int, abstract_state, iterator, config: Mapping[str, Any]):
    """Restores state and iterator at `step` into the shardings of `abstract_state`. Parameters a
    checkpoint does not hold (a lora run's frozen base) stay as `abstract_state` has them."""
    where = os.path.join(self.directory, str(step))
    try:
      saved = self.saved_config(step)
    except Exception as e:  # noqa: BLE001 -- any orbax/JSON failure means the same thing here
      raise CheckpointError(f"checkpoint {where} is corrupt or unreadable (config): {e}") from e
    check_compatible(saved, config, where)
    try:
      params_metadata = self.manager.item_metadata(step)["params"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} is corrupt or unreadable (params): {e}") from e
    abstract_params = abstract_state.checkpoint_params()
    check_shapes(getattr(params_metadata, "tree", params_metadata), abstract_params, where)
    items = dict(
      params=ocp.args.StandardRestore(abstract_params),
      train_state=ocp.args.StandardRestore(abstract_state.checkpoint_tree()),
    )
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: {e}") from e
    state = abstract_state.from_checkpoint_tree(restored["params"], restored["train_state"])
    return state, restored["data"] if iterator is not None else None


def check_compatible(saved: Mapping[str, Any], config: Mapping[str, Any], where: str) -> None:
  for section, fields in _MUST_MATCH:
    old, new = dict(saved.get(section, {})), dict(config.get(section, {}))
    keys = sorted(set(old) | set(new)) if fields is None else fields
    diffs = {
      k: (old.get(k), new.get(k)) for k in keys if k not in _MAY_DIFFER and old.get(k) != new.get(k)
    }
    if diffs:
      detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
      raise CheckpointError(
        f"checkpoint {where} is incompatible with this config ({section}: {detail}); "
        "use a new --workdir or the matching config"
      )
  if saved.get("seed") != config.get("seed"):
    raise CheckpointError(
      f"checkpoint {where} was written with seed {saved.get('seed')}, the config says "
      f"{config.get('seed')}; use a new --workdir or the matching seed"
    )


def _shape_of(leaf) -> tuple[int, ...] | None:
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else None


def check_shapes(saved_tree, target_tree, where: str) -> None:
  """Names every missing, unexpected or misshapen parameter instead of letting orbax fail deep inside."""
  saved = {
    jax.tree_util.keystr(p): _shape_of(x)
    for p, x in jax.tree_util.tree_leaves_with_path(
      saved_tree, is_leaf=lambda x: hasattr(x, "shape")
    )
  }
  target = {
    jax.tree_util.keystr(p): _shape_of(x)
    for p, x in jax.tree_util.tree_leaves_with_path(target_tree)
  }
  problems = [f"missing {k}" for k in sorted(set(target) - set(saved))]
  problems += [f"unexpected {k}" for k in sorted(set(saved) - set(target))]
  problems += [
    f"{k}: checkpoint shape {saved[k]} vs model {target[k]}"
    for k in sorted(set(saved) & set(target))
    if saved[k] != target[k]
  ]
  if problems:
    shown = "; ".join(problems[:8]) + (
      f"; ... ({len(problems)} in all)" if len(problems) > 8 else ""
    )
    raise CheckpointError(f"parameters in {where} do not fit the model: {shown}")


def resolve_params_dir(path: str) -> str:
  """`init_checkpoint` may name a params directory, a step directory, or a checkpoints root/workdir."""
  path = _abs(path)
  if not os.path.exists(path):
    raise CheckpointError(f"init_checkpoint {path} does not exist")
  if os.path.isdir(os.path.join(path, "params")):
    return os.path.join(path, "params")
  for root in (path, os.path.join(path, "checkpoints")):
    steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    if steps:
      return os.path.join(root, str(max(steps)), "params")
  if os.path.exists(os.path.join(path, "_METADATA")) or os.path.exists(
    os.path.join(path, "_sharding")
  ):
    return path
  raise CheckpointError(
    f"init_checkpoint {path} holds no parameters (expected a 'params' directory or checkpoint steps)"
  )


def restore_params(path: str, abstract_params):
  """Reads parameters only into the given shardings, from a training checkpoint, a converted model,
  or a Hugging Face LLaDA directory (config.json + safetensors)."""
  if os.path.isdir(path) and hf_format.is_hf_dir(path):
    params, _ = hf_format.load_hf_params(path)
    check_shapes(params, abstract_params, path)
    return jax.tree.map(
      lambda x, a: sharding.to_global(np.asarray(x).astype(a.dtype), a.sharding),
      params,
      abstract_params,
    )
  params_dir = resolve_params_dir(path)
  try:
    # The item's own metadata: a Checkpointer's `metadata` also reads the step-level
    # _CHECKPOINT_METADATA file, which the params item of a CheckpointManager step does not have
    # (orbax warned on every read of our training checkpoints).
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(params_dir))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"init_checkpoint {params_dir} is corrupt or unreadable: {e}") from e
  tree = getattr(metadata, "tree", metadata)
  check_shapes(tree, abstract_params, params_dir)
  try:
    return ocp.StandardCheckpointer().restore(params_dir, abstract_params)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"init_checkpoint {params_dir} is corrupt or unreadable: {e}") from e


def save_params(path: str, params) -> None:
  """Writes a params-only checkpoint (what `init_checkpoint` accepts)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(_abs(path), "params"), params)
  checkpointer.wait_until_finished()


class PreemptionHandler:
  """Turns SIGTERM into a flag the loop checks between steps (save, wait, exit 0)."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._event.set()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def requested(self) -> bool:
    """True when any process was asked to stop (all processes must agree to save together)."""
    flag = self._event.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return flag
