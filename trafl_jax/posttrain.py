"""The post-training loop for every objective: sample -> score on the host -> jitted update(s).

The reference is a checkpoint (any kind `sample.Generator.load` reads): it gives the model's shape; the
run's config gives how it is computed (dtype, remat, scan) and sharded (mesh, rules). The policy starts as
a copy of it. Prompts for step s are a pure function of (seed, s) (a fresh permutation per epoch), so a
resumed run sees the same prompts without iterator state. Checkpoints hold the policy, the log Z head,
both optimizer states and the RNG key; the reference is re-read from its checkpoint on resume.

Dimension legend (rl.py's): B prompts, G samples per prompt, N rows (B*G), P prompt, L completion, T P+L.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from trafl_jax import loop, objectives, rl, sample, sampler, sharding
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib
from trafl_jax import tasks as tasks_lib

MEMORY_FILE = "memory.json"


@dataclasses.dataclass(frozen=True)
class ProblemSource:
  """Where a split's problems come from; Countdown problems are generated like the reference's
  training data (the data section's numbers)."""

  task: str
  split: str
  path: str | None
  limit: int | None
  seed: int
  countdown_numbers: int = 3
  countdown_max_number: int = 20

  def load(self) -> list:
    kw = {}
    if self.task == "countdown":
      kw = dict(num_numbers=self.countdown_numbers, max_number=self.countdown_max_number)
    return tasks_lib.load(
      self.task, self.split, path=self.path, limit=self.limit, seed=self.seed, **kw
    )


@dataclasses.dataclass(frozen=True)
class PostTrainConfig:
  ocfg: objectives.ObjectiveConfig
  scfg: sampler.SamplerConfig
  optim: state_lib.OptimConfig
  train_problems: ProblemSource
  test_problems: ProblemSource
  seed: int
  progress: bool
  log_z_lr: float
  reference_dtype: str  # "bfloat16" halves the frozen copy's memory
  num_inner_updates: int
  prompts_per_step: int
  group_size: int
  num_steps: int
  log_every: int
  ckpt_every: int
  keep_checkpoints: int
  sample_every: int
  eval_every: int  # 0: no in-loop greedy evaluation

  @property
  def rows(self) -> int:
    return self.prompts_per_step * self.group_size


def check_rows(pcfg: PostTrainConfig, mesh) -> None:
  """The rollout batch's rows must divide over the devices the batch is split on, and its prompts
  over the processes (each samples and scores whole groups of its own prompts)."""
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if pcfg.rows % devices:
    raise ValueError(
      f"rl.prompts_per_step x rl.group_size = {pcfg.rows} rows do not divide over "
      f"the mesh's data x fsdp = {devices} devices"
    )
  if pcfg.prompts_per_step % jax.process_count():
    raise ValueError(
      f"rl.prompts_per_step = {pcfg.prompts_per_step} does not divide over {jax.process_count()} "
      "processes (each process samples and scores whole groups of its own prompts)"
    )


def prompt_indices(num_problems: int, step: int, per_step: int, seed: int) -> np.ndarray:
  """The problems of step `step`: consecutive slices of a per-epoch permutation."""
  start = step * per_step
  out = []
  while len(out) < per_step:
    epoch, offset = divmod(start + len(out), num_problems)
    perm = np.random.default_rng([seed, epoch]).permutation(num_problems)
    out.extend(perm[offset : offset + per_step - len(out)].tolist())
  return np.asarray(out)


def assemble_rollout(prompt_NxP, valid_NxP, completion_NxL, rewards_N) -> rl.Rollout:
  """The host rollout batch of (prompts, completions, rewards): the completion follows its left-padded
  prompt, every completion position valid."""
  completion_NxL = np.asarray(completion_NxL)
  ones_NxL, zeros_NxL = np.ones(completion_NxL.shape, bool), np.zeros(completion_NxL.shape, bool)
  return rl.Rollout(
    tokens_NxT=np.concatenate([prompt_NxP, completion_NxL], 1).astype(np.int32),
    valid_NxT=np.concatenate([valid_NxP, ones_NxL], 1),
    prompt_NxT=np.concatenate([valid_NxP, zeros_NxL], 1),
    completion_NxT=np.concatenate([np.zeros(prompt_NxP.shape, bool), ones_NxL], 1),
    rewards_N=np.asarray(rewards_N, np.float32),
  )


def global_rows(tree, mesh, rules):
  """Each process's rows of every leaf (row-major) assembled into global arrays on the batch axes."""
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, rules, x.ndim), x
    ),
    tree,
  )


# ----------------------------------------------------------------------------------------------
# The jitted steps, shared with scripts/memory_plan.py


class Steps(NamedTuple):
  generate: Any  # sampler.make_generate_fn at the rollout settings
  greedy: Any  # the same at temperature 0 (the in-loop evaluation)
  prepare: Any
  update: Any
  init_log_z_bias: Any


def jit_steps(model, pcfg: PostTrainConfig, mesh, rules, shardings, ref_shardings) -> Steps:
  """Every jitted function of the loop, with the run's model settings, mesh and rules."""
  prepare, update, bias = rl.jit_steps(
    model, pcfg.ocfg, pcfg.num_inner_updates, pcfg.group_size, shardings, ref_shardings, mesh, rules
  )
  greedy_cfg = dataclasses.replace(pcfg.scfg, temperature=0.0)
  return Steps(
    sampler.make_generate_fn(model, pcfg.scfg, mesh, rules, shardings.params),
    sampler.make_generate_fn(model, greedy_cfg, mesh, rules, shardings.params),
    prepare,
    update,
    bias,
  )


def step_memory(
  steps: Steps,
  mesh,
  rules,
  state,
  ref_params,
  prompts,
  rollout,
  prepared,
  names=("sampler", "prepare", "update"),
) -> dict:
  """Per-device bytes (XLA's `memory_analysis`) of the sampler, prepare and update compiled for these
  arguments (arrays or `ShapeDtypeStruct`s with shardings). The loop reports its own steps with it and
  the memory plan plans with it: one source of truth."""
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  lowered = {
    "sampler": (steps.generate.jitted, (state.params, *prompts, key)),
    "prepare": (steps.prepare, (state, ref_params, rollout)),
    "update": (steps.update, (state, rollout, prepared, 0)),
  }
  out = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for name in names:
      fn, args = lowered[name]
      t0 = time.perf_counter()
      compiled = fn.lower(*args).compile()
      out[name] = {**compiled_memory(compiled), "compile_s": time.perf_counter() - t0}
  return out


def compiled_memory(compiled) -> dict[str, int]:
  """A compiled function's per-device bytes, as XLA's `memory_analysis` gives them."""
  m = compiled.memory_analysis()
  return {
    "argument": int(m.argument_size_in_bytes),
    "output": int(m.output_size_in_bytes),
    "alias": int(m.alias_size_in_bytes),
    "temp": int(m.temp_size_in_bytes),
    "code": int(m.generated_code_size_in_bytes),
  }


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ----------------------------------------------------------------------------------------------
# The run


def _copy_tokenizer(tokenizer_file: str, workdir: str) -> None:
  """The run's checkpoints load with the reference's tokenizer (sample.find_tokenizer looks here)."""
  if not tokenizer_file:
    return
  if tokenizer_file.endswith(".json"):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
      src = os.path.join(os.path.dirname(tokenizer_file), name)
      if os.path.isfile(src):
        shutil.copy(src, os.path.join(workdir, name))
  else:
    os.makedirs(os.path.join(workdir, "tokenizer"), exist_ok=True)
    shutil.copy(tokenizer_file, os.path.join(workdir, "tokenizer", "spm.model"))


def run(
  pcfg: PostTrainConfig,
  settings: model_lib.ModelSettings,
  layout: sharding.Layout,
  workdir: str,
  reference: str,
  run_config: dict,
  max_steps: int | None = None,
) -> dict:
  """Post-trains the reference at `reference` into `workdir`; returns the last step's host metrics.
  `run_config` (the run's config as JSON values) is recorded with the model it actually ran."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  ref = sample.Generator.load(reference, settings=settings, layout=layout)
  mesh, rules, model = ref.mesh, ref.rules, ref.model
  run_config = loop.with_model(run_config, ref.cfg)
  loop.write_config(workdir, run_config)
  if jax.process_index() == 0:
    _copy_tokenizer(ref.tokenizer_file, workdir)
  check_rows(pcfg, mesh)
  problems = pcfg.train_problems.load()
  held_out = pcfg.test_problems.load() if pcfg.eval_every else []

  # Prompts tokenized once, as the reference's chat template (if any) wraps them.
  def encode(ps):
    return [ref.encode(tasks_lib.format_prompt(p)) for p in ps]

  encoded, held_out_ids = encode(problems), encode(held_out)
  width = -(-max(len(e) for e in encoded) // 8) * 8

  tx = state_lib.make_optimizer(pcfg.optim)
  _, shardings = rl.state_shardings(model, tx, pcfg.log_z_lr, pcfg.seed, mesh, rules)

  # The policy starts as the reference; the reference may be held in bfloat16.
  # Casts run under jit so both are fresh buffers: the policy's are donated to the update.
  def cast(dtype):
    return jax.jit(
      lambda t: jax.tree.map(lambda x: x.astype(dtype), t), out_shardings=ref.param_shardings
    )(ref.params)

  params, ref_params = cast(jnp.float32), cast(jnp.dtype(pcfg.reference_dtype))
  create = functools.partial(
    rl.create_state, tx=tx, log_z_lr=pcfg.log_z_lr, d_model=ref.cfg.d_model, seed=pcfg.seed
  )
  state = jax.jit(create, out_shardings=shardings, donate_argnums=0)(params)
  steps = jit_steps(model, pcfg, mesh, rules, shardings, ref.param_shardings)

  scaffold = loop.Loop(
    workdir,
    loop.LoopConfig(
      num_steps=pcfg.num_steps,
      ckpt_every=pcfg.ckpt_every,
      log_every=pcfg.log_every,
      keep_checkpoints=pcfg.keep_checkpoints,
      progress=pcfg.progress,
      desc=pcfg.ocfg.objective,
      stage="post-training",
      shown=(("reward", "rl/reward_mean"), ("loss", "rl/loss"), ("kl", "rl/kl_estimate")),
    ),
    run_config,
  )
  state, _ = scaffold.restore(state)
  g, process = pcfg.group_size, jax.process_index()
  local_prompts = pcfg.prompts_per_step // jax.process_count()
  first_step = [True]

  def step_fn(state, step):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return one_step(state, step)

  def one_step(state, step):
    t0 = time.perf_counter()
    # This process's share of the step's prompts; its rows are its slice of the global batch.
    idx = prompt_indices(len(problems), step, pcfg.prompts_per_step, pcfg.seed)
    idx = idx[process * local_prompts : (process + 1) * local_prompts]
    prompt_BxP, valid_BxP = ref.pad_prompts([encoded[i] for i in idx], local_prompts, width)
    prompt_NxP, valid_NxP = np.repeat(prompt_BxP, g, 0), np.repeat(valid_BxP, g, 0)
    prompts = global_rows((prompt_NxP, valid_NxP), mesh, rules)
    key = jax.random.fold_in(jax.random.PRNGKey(pcfg.seed + 2), step)
    completion, _ = steps.generate(state.params, *prompts, key)
    completion_NxL = sharding.local_rows(completion)
    t1 = time.perf_counter()
    texts = [ref.decode(c) for c in completion_NxL]  # each process scores its own samples
    owners = [problems[i] for i in idx for _ in range(g)]
    rewards_N = np.asarray(tasks_lib.rewards(owners, texts), np.float32)
    t2 = time.perf_counter()
    rollout = global_rows(
      assemble_rollout(prompt_NxP, valid_NxP, completion_NxL, rewards_N), mesh, rules
    )
    if step == 0 and rl.learned_log_z(pcfg.ocfg):
      state = steps.init_log_z_bias(state, rollout.rewards_N)  # the global batch's mean beta * r
    prepared = steps.prepare(state, ref_params, rollout)
    args = abstract((state, ref_params, prompts, rollout, prepared))
    for i in range(pcfg.num_inner_updates):
      state, step_metrics = steps.update(state, rollout, prepared, i)
    state = state.replace(step=state.step + 1)
    host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}  # replicated
    t3 = time.perf_counter()
    host.update(
      {
        "time/sample_s": t1 - t0,
        "time/score_s": t2 - t1,
        "time/update_s": t3 - t2,
        "perf/tokens_per_s": pcfg.rows * rollout.tokens_NxT.shape[1] / (t3 - t0),
      }
    )
    if first_step[0]:  # compiled already: what XLA says each step needs, for the memory plan
      first_step[0] = False
      _write_memory(workdir, step_memory(steps, mesh, rules, *args))
    if pcfg.eval_every and ((step + 1) % pcfg.eval_every == 0 or step + 1 == pcfg.num_steps):
      host["eval/greedy"] = _greedy_accuracy(
        ref, steps.greedy, state.params, held_out, held_out_ids, pcfg.rows
      )
    if (step + 1) % pcfg.sample_every == 0 or step == 0:  # process 0's own samples
      scaffold.writer.write_texts(
        step + 1,
        {
          f"sample/{j}": f"{owners[j].prompt.strip()} -> {texts[j]!r} (reward {rewards_N[j]:.0f})"
          for j in range(0, len(owners), g)
        },
      )
    return state, host

  _, last = scaffold.run(state, step_fn, lambda step, host: host, max_steps)
  return last


def _write_memory(workdir: str, memory: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, MEMORY_FILE), "w", encoding="utf-8") as f:
      json.dump(memory, f, indent=2)
  for name, m in memory.items():
    logging.info(
      "%s memory per device: arguments %.1f MiB, temporaries %.1f MiB, outputs %.1f MiB",
      name,
      m["argument"] / 2**20,
      m["temp"] / 2**20,
      m["output"] / 2**20,
    )


def _greedy_accuracy(ref, greedy, params, problems, encoded, rows) -> float:
  """Greedy reward on held-out prompts with the current policy (a quick signal, not the evaluation)."""
  if not problems:
    return 0.0
  width = -(-max(len(e) for e in encoded) // 8) * 8
  texts = []
  for start in range(0, len(encoded), rows):
    chunk = encoded[start : start + rows]
    prompt, valid = ref.pad_prompts(chunk, rows, width)
    completion = sharding.to_host(greedy(params, prompt, valid, jax.random.PRNGKey(0))[0])
    texts += [ref.decode(c) for c in completion[: len(chunk)]]
  return float(np.mean(tasks_lib.rewards_split(problems, texts)))
