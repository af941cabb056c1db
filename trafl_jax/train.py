"""The training loop: config -> mesh, data, model, state -> jitted steps with checkpoints and metrics.

Today the loop runs masked-diffusion training (how reference models are made). The config stops here:
everything below this module receives plain arguments and frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Mapping

import jax
import ml_collections
import optax
from absl import logging
from flax import linen as nn

from trafl_jax import checkpoint as ckpt_lib
from trafl_jax import data as data_lib
from trafl_jax import diffusion, metrics, sharding
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib
from trafl_jax.tasks import countdown


def model_config(config: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  values = {k: v for k, v in config.model.items() if k != "preset"}
  unknown = set(values) - fields
  if unknown:
    raise ValueError(f"config.model has keys the model does not know: {sorted(unknown)}")
  return model_lib.ModelConfig(**values)


def optim_config(config: ml_collections.ConfigDict) -> state_lib.OptimConfig:
  return state_lib.OptimConfig(total_steps=config.train.num_steps, **config.optim.to_dict())


# ----------------------------------------------------------------------------------------------
# Data


def _write_jsonl_atomic(path: str, records) -> None:
  """A unique temporary name: every process of a multi-host run may write the same file at once."""
  with tempfile.NamedTemporaryFile(
    "w", encoding="utf-8", dir=os.path.dirname(path), prefix=".tmp.", delete=False
  ) as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(f.name, path)


def training_records(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Prompt/answer pairs: generated Countdown (cached in the workdir) or a JSONL file."""
  dc = config.data
  if dc.source == "countdown":
    path = os.path.join(workdir, "data", f"countdown_train_{dc.num_generated}_{config.seed}.jsonl")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      problems = countdown.generate(
        dc.num_generated,
        seed=config.seed,
        num_numbers=dc.countdown_numbers,
        max_number=dc.countdown_max_number,
        split="train",
      )
      _write_jsonl_atomic(path, [{"prompt": p["prompt"], "answer": p["answer"]} for p in problems])
    return data_lib.load_jsonl(path)
  if dc.source == "jsonl":
    if not dc.train_path:
      raise ValueError("config.data.source is 'jsonl' but config.data.train_path is empty")
    return data_lib.load_jsonl(dc.train_path, prompt_key=dc.prompt_key, answer_key=dc.answer_key)
  raise ValueError(f"config.data.source {dc.source!r} is not 'countdown' or 'jsonl'")


def build_tokenizer(config: ml_collections.ConfigDict, workdir: str, records: list[dict]):
  """The run's tokenizer. A SentencePiece model trained on first use is trained by process 0 alone;
  the other processes wait for it and read the same file."""
  texts = [r["prompt"] + r["answer"] for r in records]
  mc = config.model
  build = functools.partial(
    data_lib.get_tokenizer,
    config.tokenizer.kind,
    config.tokenizer.path or None,
    workdir,
    texts,
    mc.vocab_size,
    mask_id=mc.mask_token_id,
    eos_id=mc.eos_token_id,
    pad_id=mc.pad_token_id,
  )
  if jax.process_count() == 1:
    return build()
  from jax.experimental import multihost_utils

  tokenizer = build() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("trafl_jax tokenizer ready")
  return tokenizer if tokenizer is not None else build()


# ----------------------------------------------------------------------------------------------
# The step


def train_step(
  state: state_lib.TrainState, batch: Mapping[str, jax.Array], *, model, t_min: float, schedule
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  tokens_BxT, valid_BxT, completion_BxT = batch["tokens"], batch["valid"], batch["completion"]
  rng = jax.random.fold_in(state.rng, state.step)
  masked_BxT, t_B = diffusion.forward_mask(rng, completion_BxT, t_min)
  inputs_BxT = diffusion.apply_mask(tokens_BxT, masked_BxT, model.cfg.mask_token_id)

  def loss_fn(params):
    logits_BxTxV = model.apply({"params": params}, inputs_BxT, valid_BxT)
    return diffusion.masked_diffusion_loss(
      logits_BxTxV, tokens_BxT, masked_BxT, t_B, completion_BxT
    )

  (_, step_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  step_metrics["train/grad_norm"] = optax.global_norm(grads)
  step_metrics["train/lr"] = schedule(state.step)
  return state.apply_gradients(grads), step_metrics


def compile_train_step(model, schedule, t_min, state, state_shardings, batch_shapes, mesh, rules):
  """Jits the step once, with explicit shardings and donation, and compiles it ahead of time."""
  batch_shardings = {
    k: sharding.batch_sharding(mesh, rules, len(shape)) for k, (shape, _) in batch_shapes.items()
  }
  step_fn = jax.jit(
    functools.partial(train_step, model=model, t_min=t_min, schedule=schedule),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  abstract_batch = {
    k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_shardings[k])
    for k, (shape, dtype) in batch_shapes.items()
  }
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = step_fn.lower(state, abstract_batch).compile()
  memory = compiled.memory_analysis()
  if memory is not None:
    logging.info(
      "train step memory per device: arguments %.1f MiB, temporaries %.1f MiB, outputs %.1f MiB",
      memory.argument_size_in_bytes / 2**20,
      memory.temp_size_in_bytes / 2**20,
      memory.output_size_in_bytes / 2**20,
    )
  return compiled


# ----------------------------------------------------------------------------------------------
# The run


def _check_config(config: ml_collections.ConfigDict, mesh) -> None:
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  gb = config.data.batch_size
  if gb % jax.process_count():
    raise ValueError(f"data.batch_size {gb} does not divide over {jax.process_count()} processes")
  if gb % batch_devices:
    raise ValueError(
      f"data.batch_size {gb} does not divide over the mesh's data x fsdp = {batch_devices} devices"
    )
  for key in ("num_steps", "log_every", "ckpt_every", "keep_checkpoints"):
    if config.train[key] <= 0:
      raise ValueError(f"train.{key} must be positive, got {config.train[key]}")


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run(config: ml_collections.ConfigDict, workdir: str, max_steps: int | None = None) -> dict:
  """Trains until `config.train.num_steps` (or `max_steps` more steps this call, then checkpoints).

  Returns the host metrics of the last step.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = sharding.rules_from_config(config.rules.to_dict())
  _check_config(config, mesh)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.devices.size)

  mcfg = model_config(config)
  model = model_lib.Transformer(mcfg)
  records = training_records(config, workdir)
  tokenizer = build_tokenizer(config, workdir, records)
  arrays = data_lib.encode_sft(records, tokenizer, config.data.prompt_len, config.data.answer_len)
  local_batch = config.data.batch_size // jax.process_count()
  iterator = data_lib.make_train_iterator(
    arrays,
    local_batch,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    shuffle=config.data.shuffle,
  )

  ocfg = optim_config(config)
  tx = state_lib.make_optimizer(ocfg)
  schedule = state_lib.learning_rate_schedule(ocfg)
  seq_len = config.data.prompt_len + config.data.answer_len
  rng = jax.random.PRNGKey(config.seed)
  state, state_shardings = state_lib.create_sharded_state(model, tx, rng, seq_len, mesh, rules)
  logging.info("model %s: %.2fM parameters", config.model.preset, mcfg.num_params() / 1e6)

  checkpointer = ckpt_lib.Checkpointer(workdir, config.train.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info("resuming from %s/%d", checkpointer.directory, latest)
    state, iterator = checkpointer.restore(latest, _abstract(state), iterator, config.to_dict())
  elif config.train.init_checkpoint:
    logging.info("initializing parameters from %s", config.train.init_checkpoint)
    params = ckpt_lib.restore_params(config.train.init_checkpoint, _abstract(state.params))
    state = state.replace(params=params)
  start_step = int(jax.device_get(state.step))

  batch_shapes = {k: ((config.data.batch_size,) + v.shape[1:], v.dtype) for k, v in arrays.items()}
  compiled = compile_train_step(
    model, schedule, config.train.t_min, state, state_shardings, batch_shapes, mesh, rules
  )

  num_steps = config.train.num_steps
  end_step = num_steps if max_steps is None else min(num_steps, start_step + max_steps)
  tokens_per_step = config.data.batch_size * seq_len
  writer = metrics.MetricWriter(workdir, enabled=is_main, resume_step=start_step or None)
  progress = metrics.Progress(
    num_steps, initial_step=start_step, enabled=is_main and config.train.progress
  )
  last: dict[str, float] = {}
  pending = None
  tick = time.perf_counter()

  def flush(pending):
    # Read one step late so the host never waits on the step it just dispatched.
    nonlocal tick
    step, device_metrics = pending
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    metrics.check_finite(step, host)
    now = time.perf_counter()
    host["perf/tokens_per_s"] = tokens_per_step / max(now - tick, 1e-9)
    tick = now
    writer.write_scalars(step, host)
    progress.update(step, {"loss": host["train/loss"]})
    if step % config.train.log_every == 0 or step == num_steps:
      logging.info("step %d: loss %.4f", step, host["train/loss"])
    return host

  step = start_step
  try:
    with ckpt_lib.PreemptionHandler() as preemption:
      while step < end_step:
        batch = sharding.global_batch(next(iterator), mesh, rules)
        state, step_metrics = compiled(state, batch)
        if pending is not None:
          last = flush(pending)
        step += 1
        pending = (step, step_metrics)
        stop = preemption.requested()
        if step % config.train.ckpt_every == 0 or step == end_step or stop:
          last = flush(pending)
          pending = None
          checkpointer.save(step, state, iterator, config.to_dict())
        if stop:
          logging.warning("stopped by SIGTERM at step %d; checkpoint saved", step)
          break
      if pending is not None:
        last = flush(pending)
  finally:
    checkpointer.wait()
    checkpointer.close()
    progress.close()
    writer.close()
  return last
