"""Masked-diffusion training (how reference models are made): data, model, state -> the jitted step,
run by the loop scaffold (loop.py) with checkpoints and metrics. Takes `TrainConfig` (config_lib.py makes
it from a run's config)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Mapping

import jax
import optax
from absl import logging
from flax import linen as nn

from trafl_jax import checkpoint as ckpt_lib
from trafl_jax import data as data_lib
from trafl_jax import diffusion, loop, sharding
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib
from trafl_jax.tasks import countdown


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str  # "countdown" (generated, no download) or "jsonl"
  train_path: str
  prompt_key: str
  answer_key: str
  num_generated: int
  countdown_numbers: int
  countdown_max_number: int
  prompt_len: int
  answer_len: int
  # Completion canvases drawn per training step (empty: answer_len only). Records must fit the smallest;
  # answer_len is the largest. A reference trained on several lengths can be sampled at any of them.
  answer_lens: tuple[int, ...]
  batch_size: int  # global, over all processes
  shuffle: bool
  too_long: str  # "error" | "drop" (records longer than prompt_len + answer_len)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int
  data: DataConfig
  optim: state_lib.OptimConfig
  tokenizer_kind: str
  tokenizer_path: str
  num_steps: int
  t_min: float
  log_every: int
  ckpt_every: int
  keep_checkpoints: int
  init_checkpoint: str
  progress: bool


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


def training_records(dc: DataConfig, seed: int, workdir: str) -> list[dict]:
  """Prompt/answer pairs: generated Countdown (cached in the workdir) or a JSONL file."""
  if dc.source == "countdown":
    path = os.path.join(workdir, "data", f"countdown_train_{dc.num_generated}_{seed}.jsonl")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      problems = countdown.generate(
        dc.num_generated,
        seed=seed,
        num_numbers=dc.countdown_numbers,
        max_number=dc.countdown_max_number,
        split="sft",  # the part of the problem space no post-training prompt or test problem is in
      )
      _write_jsonl_atomic(path, [{"prompt": p["prompt"], "answer": p["answer"]} for p in problems])
    return data_lib.load_jsonl(path)
  if dc.source == "jsonl":
    if not dc.train_path:
      raise ValueError("config.data.source is 'jsonl' but config.data.train_path is empty")
    return data_lib.load_jsonl(dc.train_path, prompt_key=dc.prompt_key, answer_key=dc.answer_key)
  raise ValueError(f"config.data.source {dc.source!r} is not 'countdown' or 'jsonl'")


def build_tokenizer(cfg: TrainConfig, mc, workdir: str, records: list[dict]):
  """The run's tokenizer. A SentencePiece model trained on first use is trained by process 0 alone;
  the other processes wait for it and read the same file."""
  texts = [r["prompt"] + r["answer"] for r in records]
  build = functools.partial(
    data_lib.get_tokenizer,
    cfg.tokenizer_kind,
    cfg.tokenizer_path or None,
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


def canvas_lengths(data: DataConfig) -> tuple[int, ...]:
  """The completion canvases training draws from: `data.answer_lens`, or `(data.answer_len,)`."""
  if not data.answer_lens:
    return (data.answer_len,)
  lengths = tuple(sorted(set(data.answer_lens)))
  if lengths[0] < 1 or lengths[-1] != data.answer_len:
    raise ValueError(
      f"data.answer_lens {tuple(data.answer_lens)} must be positive with its largest equal to "
      f"data.answer_len={data.answer_len} (the canvas the model's state is built for)"
    )
  return lengths


def _check_batch(batch_size: int, mesh) -> None:
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % jax.process_count():
    raise ValueError(
      f"data.batch_size {batch_size} does not divide over {jax.process_count()} processes"
    )
  if batch_size % batch_devices:
    raise ValueError(
      f"data.batch_size {batch_size} does not divide over the mesh's data x fsdp = "
      f"{batch_devices} devices"
    )


def run(
  cfg: TrainConfig,
  model_cfg: model_lib.ModelConfig,
  layout: sharding.Layout,
  workdir: str,
  run_config: dict,
  max_steps: int | None = None,
) -> dict:
  """Trains until `cfg.num_steps` (or `max_steps` more steps this call, then checkpoints).
  `run_config` is what the checkpoints and `config.json` record. Returns the last step's host metrics."""
  workdir = os.path.abspath(workdir)
  loop_cfg = loop.LoopConfig(
    num_steps=cfg.num_steps,
    ckpt_every=cfg.ckpt_every,
    log_every=cfg.log_every,
    keep_checkpoints=cfg.keep_checkpoints,
    progress=cfg.progress,
    shown=(("loss", "train/loss"),),
  )
  mesh, rules = layout.make_mesh(), layout.rules
  _check_batch(cfg.data.batch_size, mesh)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.devices.size)
  loop.write_config(workdir, run_config)

  model = model_lib.Transformer(model_cfg)
  records = training_records(cfg.data, cfg.seed, workdir)
  tokenizer = build_tokenizer(cfg, model_cfg, workdir, records)
  lengths = canvas_lengths(cfg.data)
  arrays = data_lib.encode_sft(
    records, tokenizer, cfg.data.prompt_len, min(lengths), cfg.data.too_long
  )
  arrays = data_lib.extend_canvas(arrays, max(lengths) - min(lengths), tokenizer.eos_id)
  iterator = data_lib.make_train_iterator(
    arrays,
    cfg.data.batch_size // jax.process_count(),
    seed=cfg.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    shuffle=cfg.data.shuffle,
  )

  tx = state_lib.make_optimizer(cfg.optim)
  schedule = state_lib.learning_rate_schedule(cfg.optim)
  seq_len = cfg.data.prompt_len + cfg.data.answer_len
  state, state_shardings = state_lib.create_sharded_state(
    model, tx, jax.random.PRNGKey(cfg.seed), seq_len, mesh, rules
  )
  logging.info("model: %.2fM parameters", model_cfg.num_params() / 1e6)

  scaffold = loop.Loop(workdir, loop_cfg, run_config)
  resumed = scaffold.checkpointer.latest_step() is not None
  state, iterator = scaffold.restore(state, iterator)
  if not resumed and cfg.init_checkpoint:
    logging.info("initializing parameters from %s", cfg.init_checkpoint)
    params = ckpt_lib.restore_params(cfg.init_checkpoint, sharding.abstract(state.params))
    state = state.replace(params=params)

  compiled = {}  # one train step per canvas length, compiled on first use

  def compiled_for(length, state):
    if length not in compiled:
      shapes = {
        k: ((cfg.data.batch_size, cfg.data.prompt_len + length), v.dtype) for k, v in arrays.items()
      }
      compiled[length] = compile_train_step(
        model, schedule, cfg.t_min, state, state_shardings, shapes, mesh, rules
      )
    return compiled[length]

  tick = time.perf_counter()

  def step_fn(state, step):
    length = data_lib.canvas_length(lengths, cfg.seed, step)
    batch = data_lib.crop_canvas(next(iterator), cfg.data.prompt_len + length)
    return compiled_for(length, state)(state, sharding.global_batch(batch, mesh, rules))

  def read(step, device_metrics):  # `step` counts steps done: step_fn's was step - 1
    nonlocal tick
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    length = data_lib.canvas_length(lengths, cfg.seed, step - 1)
    tokens = cfg.data.batch_size * (cfg.data.prompt_len + length)
    host["perf/tokens_per_s"] = tokens / max(now - tick, 1e-9)
    if len(lengths) > 1:
      host["train/canvas_length"] = float(length)
    tick = now
    return host

  _, last = scaffold.run(state, step_fn, read, max_steps, iterator)
  return last
