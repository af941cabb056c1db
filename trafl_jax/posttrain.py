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

from trafl_jax import checkpoint as ckpt_lib
from trafl_jax import diagnostics, loop, objectives, rl, sample, sampler, sharding
from trafl_jax import lora as lora_lib
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
  reference_dtype: str  # "bfloat16" halves the frozen copy's memory (not with lora: one base)
  num_inner_updates: int
  prompts_per_step: int
  group_size: int
  num_steps: int
  # Of each group, this many completions come from the reference (members 0..k-1), the rest from the
  # policy: off-policy rows trajectory balance accepts as they are (w = 1).
  reference_rollouts: int
  log_every: int
  ckpt_every: int
  keep_checkpoints: int
  sample_every: int  # 0: only the first step's samples
  eval_every: int  # 0: no in-loop greedy evaluation
  diag_noise_every: int  # diag/mask_noise from a second mask draw every this many steps; 0: never
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()  # rank 0: full post-training

  def __post_init__(self):
    if not 0 <= self.reference_rollouts <= self.group_size:
      raise ValueError(
        f"rl.reference_rollouts = {self.reference_rollouts} must be between 0 and rl.group_size = "
        f"{self.group_size}"
      )
    if self.reference_rollouts and self.ocfg.objective != "trafl":
      raise ValueError(
        "rl.reference_rollouts is TraFL's (trajectory balance is valid off-policy); the GRPO "
        "baselines' ratios assume on-policy rollouts"
      )

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
  for members in {pcfg.reference_rollouts, pcfg.group_size - pcfg.reference_rollouts} - {0}:
    if (pcfg.prompts_per_step * members) % devices:
      raise ValueError(
        f"rl.reference_rollouts = {pcfg.reference_rollouts} splits each group's sampling into "
        f"{pcfg.prompts_per_step} x {members} rows, which do not divide over the mesh's data x fsdp "
        f"= {devices} devices"
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


def assemble_rollout(
  prompt_NxP, valid_NxP, completion_NxL, rewards_N, commit_step_NxL
) -> objectives.Rollout:
  """The host rollout batch of (prompts, completions, rewards, the sampler's commit steps): the
  completion follows its left-padded prompt, every completion position valid; the prompt's commit
  steps are -1."""
  completion_NxL = np.asarray(completion_NxL)
  ones_NxL, zeros_NxL = np.ones(completion_NxL.shape, bool), np.zeros(completion_NxL.shape, bool)
  no_step_NxP = np.full(prompt_NxP.shape, -1, np.int32)
  return objectives.Rollout(
    tokens_NxT=np.concatenate([prompt_NxP, completion_NxL], 1).astype(np.int32),
    valid_NxT=np.concatenate([valid_NxP, ones_NxL], 1),
    prompt_NxT=np.concatenate([valid_NxP, zeros_NxL], 1),
    completion_NxT=np.concatenate([np.zeros(prompt_NxP.shape, bool), ones_NxL], 1),
    rewards_N=np.asarray(rewards_N, np.float32),
    commit_step_NxT=np.concatenate([no_step_NxP, commit_step_NxL], 1).astype(np.int32),
  )


# ----------------------------------------------------------------------------------------------
# The jitted steps, shared with scripts/memory_plan.py


class Steps(NamedTuple):
  generate: Any  # sampler.make_generate_fn at the rollout settings
  generate_ref: Any  # the same for the reference's parameters (rl.reference_rollouts)
  greedy: Any  # the same at temperature 0 (the in-loop evaluation)
  prepare: Any
  update: Any
  init_log_z_bias: Any
  mask_noise: Any  # (state, ref_params, rollout, prepared) -> diag/mask_noise


def jit_steps(model, pcfg: PostTrainConfig, mesh, rules, shardings, ref_shardings) -> Steps:
  """Every jitted function of the loop, with the run's model settings, mesh and rules.
  `ref_shardings` None: the reference is the policy's base (lora)."""
  prepare, update, bias = rl.jit_steps(
    model, pcfg.ocfg, pcfg.num_inner_updates, pcfg.group_size, shardings, ref_shardings, mesh, rules
  )
  greedy_cfg = dataclasses.replace(pcfg.scfg, temperature=0.0)
  if ref_shardings is None:
    ref_shardings = lora_lib.base_of(shardings.params)
  return Steps(
    sampler.make_generate_fn(model, pcfg.scfg, mesh, rules, shardings.params),
    sampler.make_generate_fn(model, pcfg.scfg, mesh, rules, ref_shardings),
    sampler.make_generate_fn(model, greedy_cfg, mesh, rules, shardings.params),
    prepare,
    update,
    bias,
    _mask_noise_fn(prepare, sharding.replicated(mesh)),
  )


def _mask_noise_fn(prepare, replicated):
  """`diag/mask_noise` from a second, independent draw: `prepare` again (the same compiled function)
  with the state's key folded, and inner update 0's `l_old - l_ref` compared under the two draws. The
  state is the one before the first update, where `l_theta = l_old`, so this estimates `Var_M` of the
  `l` the loss uses (all K masks: the square residual's; the product residual's halves log
  trafl/mask_noise)."""
  other_key = jax.jit(lambda rng: jax.random.fold_in(rng, 0x6E6F6973), out_shardings=replicated)
  noise = jax.jit(
    lambda a, b: diagnostics.mask_noise(
      a.l_old_IxN[0], a.l_ref_IxN[0], b.l_old_IxN[0], b.l_ref_IxN[0]
    ),
    out_shardings=replicated,
  )

  def mask_noise(state, ref_params, rollout, prepared):
    other = prepare(state.replace(rng=other_key(state.rng)), ref_params, rollout)
    return noise(prepared, other)

  return mask_noise


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


class Prompts(NamedTuple):
  """A split's problems and their token ids (as the reference's chat template, if any, wraps them)."""

  problems: list
  ids: list[list[int]]
  width: int  # the longest prompt, rounded up to 8: one prompt shape for the whole run

  @classmethod
  def encode(cls, ref: sample.Generator, problems: list) -> Prompts:
    ids = [ref.encode(tasks_lib.format_prompt(p)) for p in problems]
    return cls(problems, ids, -(-max((len(e) for e in ids), default=1) // 8) * 8)


class Rollouts(NamedTuple):
  """One step's rollouts: the global prompt and rollout arrays, and this process's own rows."""

  prompts: tuple  # (prompt_NxP, valid_NxP) global arrays
  rollout: objectives.Rollout  # global arrays
  owners: list  # this process's problems, one per row
  texts: list[str]
  rewards_N: np.ndarray
  sample_s: float
  score_s: float
  nfe_per_token: float  # model evaluations per generated token, this process's rows


def initial_state(ref: sample.Generator, pcfg: PostTrainConfig, tx, shardings, model):
  """`(state, ref_params)`: the policy starts as a float32 copy of the reference, which may be held in
  bfloat16. The casts run under jit so both are fresh buffers (the policy's are donated). With lora the
  policy is the reference's parameters in `lora.base_dtype` (`lora.prepare_base`) plus fresh
  adapters (`model` has them), and
  `ref_params` is None: the reference is that base with the adapters off."""

  def cast(dtype):
    return jax.jit(
      lambda t: jax.tree.map(lambda x: x.astype(dtype), t), out_shardings=ref.param_shardings
    )(ref.params)

  if pcfg.lora.enabled:
    abstract = nn.unbox(state_lib.abstract_params(model))
    adapters = jax.jit(
      lambda key: lora_lib.init_adapters(abstract, key),
      out_shardings=lora_lib.adapters_of(shardings.params),
    )(jax.random.PRNGKey(pcfg.seed + 3))
    # The reference was loaded into host memory: only the prepared base reaches the devices.
    base = lora_lib.place_base(ref.params, pcfg.lora.base_dtype, lora_lib.base_of(shardings.params))
    params = lora_lib.combine(base, adapters)
    ref_params = None
  else:
    params, ref_params = cast(jnp.float32), cast(jnp.dtype(pcfg.reference_dtype))
  create = functools.partial(
    rl.create_state,
    tx=tx,
    log_z_lr=pcfg.log_z_lr,
    d_model=ref.cfg.d_model,
    seed=pcfg.seed,
  )
  return jax.jit(create, out_shardings=shardings, donate_argnums=0)(params), ref_params


class PostTraining:
  """One run's loop body: what stays fixed between steps (the reference, prompts, jitted steps) and
  `step(state, step) -> (state, host metrics)`: sample -> score -> prepare -> update(s)."""

  def __init__(self, pcfg: PostTrainConfig, ref: sample.Generator, workdir: str, steps: Steps):
    self.pcfg, self.ref, self.workdir, self.steps = pcfg, ref, workdir, steps
    self.train = Prompts.encode(ref, pcfg.train_problems.load())
    self.held_out = Prompts.encode(ref, pcfg.test_problems.load() if pcfg.eval_every else [])
    self.ref_params = None
    self.scaffold: loop.Loop | None = None  # its writer takes the samples
    self._memory_written = False

  def sample_and_score(self, params, step: int) -> Rollouts:
    """This process's share of the step's prompts (whole groups; its rows are its slice of the global
    batch), G completions each, decoded and scored here."""
    pcfg, ref, g = self.pcfg, self.ref, self.pcfg.group_size
    mesh, rules = ref.mesh, ref.rules
    t0 = time.perf_counter()
    local = pcfg.prompts_per_step // jax.process_count()
    idx = prompt_indices(len(self.train.problems), step, pcfg.prompts_per_step, pcfg.seed)
    idx = idx[jax.process_index() * local : (jax.process_index() + 1) * local]
    prompt_BxP, valid_BxP = ref.pad_prompts(
      [self.train.ids[i] for i in idx], local, self.train.width
    )
    prompt_NxP, valid_NxP = np.repeat(prompt_BxP, g, 0), np.repeat(valid_BxP, g, 0)
    prompts = sharding.global_batch((prompt_NxP, valid_NxP), mesh, rules)
    key = jax.random.fold_in(jax.random.PRNGKey(pcfg.seed + 2), step)
    completion_NxL, commit_step_NxL, nfe_N = self._generate(params, prompt_BxP, valid_BxP, key)
    t1 = time.perf_counter()
    texts = [ref.decode(c) for c in completion_NxL]
    owners = [self.train.problems[i] for i in idx for _ in range(g)]
    rewards_N = np.asarray(tasks_lib.rewards(owners, texts), np.float32)
    t2 = time.perf_counter()
    rollout = sharding.global_batch(
      assemble_rollout(prompt_NxP, valid_NxP, completion_NxL, rewards_N, commit_step_NxL),
      mesh,
      rules,
    )
    nfe_per_token = float(nfe_N.mean()) / completion_NxL.shape[1]
    return Rollouts(prompts, rollout, owners, texts, rewards_N, t1 - t0, t2 - t1, nfe_per_token)

  def _generate(self, params, prompt_BxP, valid_BxP, key):
    """This process's `(completion_NxL, commit_step_NxL, nfe_N)`, G rows per prompt: members
    `0..reference_rollouts-1` of each group sampled from the reference, the rest from `params`."""
    g, k = self.pcfg.group_size, self.pcfg.reference_rollouts
    mesh, rules = self.ref.mesh, self.ref.rules
    parts = []
    reference = lora_lib.base_of(params) if self.ref_params is None else self.ref_params
    sources = ((self.steps.generate_ref, reference, k, 1), (self.steps.generate, params, g - k, 0))
    for generate, source, members, salt in sources:
      if not members:
        continue
      prompts = (np.repeat(prompt_BxP, members, 0), np.repeat(valid_BxP, members, 0))
      # Salt 0 keeps the on-policy stream of reference_rollouts = 0 as it was.
      out = generate(
        source,
        *sharding.global_batch(prompts, mesh, rules),
        jax.random.fold_in(key, salt) if salt else key,
      )
      b = prompt_BxP.shape[0]
      fields = (out.completion_BxL, out.commit_step_BxL, out.nfe_B[:, None])
      parts.append([sharding.local_rows(x).reshape(b, members, -1) for x in fields])
    completion, commit_step, nfe = (np.concatenate(xs, 1) for xs in zip(*parts))
    length = completion.shape[-1]
    return completion.reshape(-1, length), commit_step.reshape(-1, length), nfe.reshape(-1)

  def update(self, state, rollouts: Rollouts, step: int):
    """`(state, device metrics)` after prepare and the inner updates on one step's rollouts."""
    steps, rollout = self.steps, rollouts.rollout
    if step == 0 and objectives.learned_log_z(self.pcfg.ocfg):
      state = steps.init_log_z_bias(state, rollout.rewards_N)  # log Z of the batch's success rate
    prepared = steps.prepare(state, self.ref_params, rollout)
    args = sharding.abstract((state, self.ref_params, rollouts.prompts, rollout, prepared))
    extra = {}
    every = self.pcfg.diag_noise_every
    # Steps `every`, 2 `every`, ... (counted from 1, like eval_every): on step 1 the policy is the
    # reference and the noise of l_theta - l_ref is 0. Before the updates: the policy prepare scored.
    if every and (step + 1) % every == 0:
      extra["diag/mask_noise"] = steps.mask_noise(state, self.ref_params, rollout, prepared)
    for i in range(self.pcfg.num_inner_updates):
      state, step_metrics = steps.update(state, rollout, prepared, i)
    step_metrics = {**step_metrics, **extra}
    if not self._memory_written:  # after the first calls: the lowering finds them compiled
      self._memory_written = True
      _write_memory(self.workdir, step_memory(steps, self.ref.mesh, self.ref.rules, *args))
    return state.replace(step=state.step + 1), step_metrics

  def step(self, state, step: int):
    pcfg, g = self.pcfg, self.pcfg.group_size
    with jax.set_mesh(self.ref.mesh), nn.logical_axis_rules(self.ref.rules):
      t0 = time.perf_counter()
      rollouts = self.sample_and_score(state.params, step)
      t2 = time.perf_counter()
      state, step_metrics = self.update(state, rollouts, step)
      host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}  # replicated
      t3 = time.perf_counter()
      host.update(
        {
          "time/sample_s": rollouts.sample_s,
          "time/score_s": rollouts.score_s,
          "rollout/nfe_per_token": rollouts.nfe_per_token,
          "time/update_s": t3 - t2,
          "perf/tokens_per_s": pcfg.rows * rollouts.rollout.tokens_NxT.shape[1] / (t3 - t0),
        }
      )
      if pcfg.reference_rollouts:  # this process's rows, by source
        rewards_BxG = rollouts.rewards_N.reshape(-1, g)
        host["rl/reward_reference_rows"] = float(rewards_BxG[:, : pcfg.reference_rollouts].mean())
        if pcfg.reference_rollouts < g:
          host["rl/reward_policy_rows"] = float(rewards_BxG[:, pcfg.reference_rollouts :].mean())
      done = step + 1
      if pcfg.eval_every and (done % pcfg.eval_every == 0 or done == pcfg.num_steps):
        host["eval/greedy"] = _greedy_accuracy(
          self.ref, self.steps.greedy, state.params, self.held_out, pcfg.rows
        )
    # Process 0's own samples, at the first step and every sample_every steps.
    if done == 1 or (pcfg.sample_every and done % pcfg.sample_every == 0):
      owners, texts, rewards_N = rollouts.owners, rollouts.texts, rollouts.rewards_N
      self.scaffold.writer.write_texts(
        done,
        {
          f"sample/{j}": f"{owners[j].prompt.strip()} -> {texts[j]!r} (reward {rewards_N[j]:.0f}, "
          f"sampler {pcfg.scfg.mode})"
          for j in range(0, len(owners), g)
        },
      )
    return state, host


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
  ref = sample.Generator.load(
    reference, settings=settings, layout=layout, on_host=pcfg.lora.enabled
  )
  mesh, rules = ref.mesh, ref.rules
  model = model_lib.Transformer(pcfg.lora.adapt(ref.cfg))  # the policy's (with its adapters)
  run_config = loop.with_model(run_config, model.cfg)
  if pcfg.lora.enabled:  # adapters are only valid on their base: its path and fingerprint
    fingerprint = lora_lib.fingerprint(ref.params)
    run_config["lora_base"] = {"path": reference, "fingerprint": fingerprint.tolist()}
  loop.write_config(workdir, run_config)
  if jax.process_index() == 0:
    _copy_tokenizer(ref.tokenizer_file, workdir)
  check_rows(pcfg, mesh)
  tx = state_lib.make_optimizer(pcfg.optim)
  _, shardings = rl.state_shardings(model, tx, pcfg.log_z_lr, pcfg.seed, mesh, rules)
  ref_shardings = None if pcfg.lora.enabled else ref.param_shardings
  steps = jit_steps(model, pcfg, mesh, rules, shardings, ref_shardings)
  body = PostTraining(pcfg, ref, workdir, steps)
  state, body.ref_params = initial_state(ref, pcfg, tx, shardings, model)
  # The loaded reference is now in the state (and ref_params): drop it, or a lora run would hold its
  # base twice and a full run the loaded copy beside the policy and reference the memory plan counts.
  ref.params = None
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
  if pcfg.lora.enabled:
    _check_same_base(scaffold.checkpointer, run_config["lora_base"])
  state, _ = scaffold.restore(state)
  body.scaffold = scaffold
  _, last = scaffold.run(state, body.step, lambda step, host: host, max_steps)
  return last


def _check_same_base(checkpointer, base: dict) -> None:
  """A lora run resumes only on the base its adapters were trained on."""
  latest = checkpointer.latest_step()
  if latest is None:
    return
  saved = checkpointer.saved_config(latest).get("lora_base")
  if saved is None or not lora_lib.same_base(saved["fingerprint"], base["fingerprint"]):
    where = os.path.join(checkpointer.directory, str(latest))
    was = "no base recorded" if saved is None else f"base {saved['path']}"
    raise ckpt_lib.CheckpointError(
      f"checkpoint {where} holds adapters trained on {was}; this run's base {base['path']} has "
      "different parameters (fingerprints differ): resume with the same rl.reference, or use a new "
      "--workdir"
    )


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


def _greedy_accuracy(ref, greedy, params, held_out: Prompts, rows: int) -> float:
  """Greedy reward on held-out prompts with the current policy (a quick signal, not the evaluation)."""
  if not held_out.problems:
    return 0.0
  texts = []
  for start in range(0, len(held_out.ids), rows):
    chunk = held_out.ids[start : start + rows]
    prompt, valid = ref.pad_prompts(chunk, rows, held_out.width)
    completion = sharding.to_host(greedy(params, prompt, valid, jax.random.PRNGKey(0))[0])
    texts += [ref.decode(c) for c in completion[: len(chunk)]]
  return float(np.mean(tasks_lib.rewards_split(held_out.problems, texts)))
