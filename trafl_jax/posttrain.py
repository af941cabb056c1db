"""The post-training loop for every objective: sample -> score on the host -> jitted update(s).

The reference is a checkpoint (any kind `sample.Generator.load` reads); the policy starts as a copy of it.
Prompts for step s are a pure function of (seed, s) (a fresh permutation per epoch), so a resumed run sees the
same prompts without iterator state. Checkpoints hold the policy, the log Z head, both optimizer states and
the RNG key; the reference is re-read from its checkpoint on resume.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from trafl_jax import checkpoint as ckpt_lib
from trafl_jax import evaluate, metrics, objectives, rl, sample, sampler, sharding
from trafl_jax import state as state_lib
from trafl_jax import tasks as tasks_lib


def objective_config(config: ml_collections.ConfigDict) -> objectives.ObjectiveConfig:
  fields = {f.name for f in dataclasses.fields(objectives.ObjectiveConfig)}
  return objectives.ObjectiveConfig(**{k: v for k, v in config.rl.items() if k in fields})


def sampler_config(config: ml_collections.ConfigDict) -> sampler.SamplerConfig:
  r = config.rl
  return sampler.SamplerConfig(
    gen_length=r.gen_length,
    steps=r.sample_steps,
    block_length=r.block_length,
    temperature=r.temperature,
    remasking=r.remasking,
  )


def optim_config(config: ml_collections.ConfigDict) -> state_lib.OptimConfig:
  """The policy's AdamW: constant rate after warmup (post-training runs are short)."""
  r = config.rl
  return state_lib.OptimConfig(
    lr=r.lr,
    schedule="constant",
    warmup_steps=r.warmup_steps,
    min_lr_ratio=1.0,
    weight_decay=r.weight_decay,
    b1=0.9,
    b2=0.99,
    eps=1e-8,
    grad_clip=r.grad_clip,
    total_steps=r.num_steps,
  )


def check_rows(config: ml_collections.ConfigDict, mesh) -> None:
  """The rollout batch's rows must divide over the devices the batch is split on."""
  rows, devices = (
    config.rl.prompts_per_step * config.rl.group_size,
    mesh.shape["data"] * mesh.shape["fsdp"],
  )
  if rows % devices:
    raise ValueError(
      f"rl.prompts_per_step x rl.group_size = {rows} rows do not divide over "
      f"the mesh's data x fsdp = {devices} devices"
    )


def _copy_tokenizer(tokenizer_file: str, workdir: str) -> None:
  """The run's checkpoints load with the reference's tokenizer (sample.find_tokenizer looks here)."""
  if tokenizer_file.endswith(".json"):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
      src = os.path.join(os.path.dirname(tokenizer_file), name)
      if os.path.isfile(src):
        shutil.copy(src, os.path.join(workdir, name))
  else:
    os.makedirs(os.path.join(workdir, "tokenizer"), exist_ok=True)
    shutil.copy(tokenizer_file, os.path.join(workdir, "tokenizer", "spm.model"))


def load_problems(config: ml_collections.ConfigDict, split: str) -> list:
  """Training ("train") or held-out ("test") prompts of `config.rl.task`; Countdown problems are
  generated like the reference's training data (the data section's numbers)."""
  r = config.rl
  kw = {}
  if r.task == "countdown":
    kw = dict(
      num_numbers=config.data.countdown_numbers, max_number=config.data.countdown_max_number
    )
  if split == "train":
    path, limit = r.train_path or None, r.train_limit or None
  else:
    path, limit = r.eval_path or None, r.eval_problems
  return tasks_lib.load(r.task, split, path=path, limit=limit, seed=config.seed, **kw)


def prompt_indices(num_problems: int, step: int, per_step: int, seed: int) -> np.ndarray:
  """The problems of step `step`: consecutive slices of a per-epoch permutation."""
  start = step * per_step
  out = []
  while len(out) < per_step:
    epoch, offset = divmod(start + len(out), num_problems)
    perm = np.random.default_rng([seed, epoch]).permutation(num_problems)
    out.extend(perm[offset : offset + per_step - len(out)].tolist())
  return np.asarray(out)


def run(
  config: ml_collections.ConfigDict, workdir: str, reference: str, max_steps: int | None = None
) -> dict:
  """Post-trains the reference at `reference` with `config.rl` into `workdir`; returns last metrics."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  r = config.rl
  ocfg, scfg = objective_config(config), sampler_config(config)
  mesh_axes = config.mesh.to_dict()
  ref = sample.Generator.load(reference, mesh=mesh_axes)
  mesh, rules, model = ref.mesh, ref.rules, ref.model
  if jax.process_index() == 0:
    _copy_tokenizer(ref.tokenizer_file, workdir)
  g = r.group_size
  check_rows(config, mesh)
  process, local_prompts = jax.process_index(), r.prompts_per_step // jax.process_count()
  if r.prompts_per_step % jax.process_count():
    raise ValueError(
      f"rl.prompts_per_step = {r.prompts_per_step} does not divide over {jax.process_count()} "
      "processes (each process samples and scores whole groups of its own prompts)"
    )
  problems = load_problems(config, "train")
  held_out = load_problems(config, "test") if r.eval_every else []

  def encode(ps):  # prompts tokenized once, as the reference's chat template (if any) wraps them
    return [ref.tokenizer.encode(ref.format_prompt(tasks_lib.format_prompt(p))) for p in ps]

  encoded, held_out_ids = encode(problems), encode(held_out)
  width = -(-max(len(e) for e in encoded) // 8) * 8

  # The policy starts as the reference; the reference may be held in bfloat16.
  # Casts run under jit so both are fresh buffers: the policy's are donated to the update.
  def cast(dtype):
    return jax.jit(
      lambda t: jax.tree.map(lambda x: x.astype(dtype), t), out_shardings=ref.param_shardings
    )(ref.params)

  tx = state_lib.make_optimizer(optim_config(config))
  abstract, shardings = rl.state_shardings(model, tx, r.log_z_lr, config.seed, mesh, rules)
  ref_shardings = ref.param_shardings
  params, ref_params = cast(jnp.float32), cast(jnp.dtype(r.reference_dtype))
  create = functools.partial(
    rl.create_state, tx=tx, log_z_lr=r.log_z_lr, d_model=ref.cfg.d_model, seed=config.seed
  )
  state = jax.jit(create, out_shardings=shardings, donate_argnums=0)(params)

  run_config = config.to_dict()
  run_config["model"] = dataclasses.asdict(ref.cfg)  # the checkpoint describes the actual model
  checkpointer = ckpt_lib.Checkpointer(workdir, r.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info("resuming post-training from %s/%d", checkpointer.directory, latest)
    state, _ = checkpointer.restore(latest, abstract, None, run_config)
  start_step = int(jax.device_get(state.step))

  generate = sampler.make_generate_fn(model, scfg, mesh, rules, ref.param_shardings)
  greedy = sampler.make_generate_fn(
    model, dataclasses.replace(scfg, temperature=0.0), mesh, rules, ref.param_shardings
  )
  prepare, update, init_log_z_bias = rl.jit_steps(
    model, ocfg, r.num_inner_updates, g, shardings, ref_shardings, mesh, rules
  )

  is_main = jax.process_index() == 0
  writer = metrics.MetricWriter(workdir, enabled=is_main, resume_step=start_step or None)
  progress = metrics.Progress(
    r.num_steps, start_step, enabled=is_main and config.train.progress, desc=r.objective
  )
  end_step = r.num_steps if max_steps is None else min(r.num_steps, start_step + max_steps)
  rows = r.prompts_per_step * g
  last: dict[str, float] = {}
  step = start_step
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), ckpt_lib.PreemptionHandler() as stop:
      while step < end_step:
        t0 = time.perf_counter()
        # This process's share of the step's prompts; its rows are its slice of the global batch.
        idx = prompt_indices(len(problems), step, r.prompts_per_step, config.seed)
        idx = idx[process * local_prompts : (process + 1) * local_prompts]
        prompt_BxP, valid_BxP = ref.pad_prompts([encoded[i] for i in idx], local_prompts, width)
        prompt_NxP, valid_NxP = np.repeat(prompt_BxP, g, 0), np.repeat(valid_BxP, g, 0)
        prompts = sharding.global_batch({"tokens": prompt_NxP, "valid": valid_NxP}, mesh, rules)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), step)
        completion, _ = generate(state.params, prompts["tokens"], prompts["valid"], key)
        completion_NxL = sharding.local_rows(completion)
        t1 = time.perf_counter()
        texts = [ref.decode(c) for c in completion_NxL]  # each process scores its own samples
        owners = [problems[i] for i in idx for _ in range(g)]
        rewards_N = np.asarray(tasks_lib.rewards(owners, texts), np.float32)
        t2 = time.perf_counter()
        local = {
          "tokens": np.concatenate([prompt_NxP, completion_NxL], 1).astype(np.int32),
          "valid": np.concatenate([valid_NxP, np.ones(completion_NxL.shape, bool)], 1),
          "prompt": np.concatenate([valid_NxP, np.zeros(completion_NxL.shape, bool)], 1),
          "completion": np.concatenate(
            [np.zeros(prompt_NxP.shape, bool), np.ones(completion_NxL.shape, bool)], 1
          ),
          "rewards": rewards_N,
        }
        batch = sharding.global_batch(local, mesh, rules)
        if step == 0 and ocfg.objective == "trafl" and ocfg.log_z == "mlp":
          state = init_log_z_bias(state, batch["rewards"])  # the global batch's mean beta * r
        prepared = prepare(state, ref_params, batch)
        for i in range(r.num_inner_updates):
          state, step_metrics = update(state, batch, prepared, i)
        state = state.replace(step=state.step + 1)
        host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}  # replicated
        t3 = time.perf_counter()
        step += 1
        metrics.check_finite(step, host)
        host.update(
          {
            "time/sample_s": t1 - t0,
            "time/score_s": t2 - t1,
            "time/update_s": t3 - t2,
            "perf/tokens_per_s": rows * batch["tokens"].shape[1] / (t3 - t0),
          }
        )
        if r.eval_every and (step % r.eval_every == 0 or step == r.num_steps):
          host["eval/greedy"] = _greedy_accuracy(
            ref, greedy, state.params, held_out, held_out_ids, rows
          )
        writer.write_scalars(step, host)
        if step % r.sample_every == 0 or step == 1:  # process 0's own samples
          writer.write_texts(
            step,
            {
              f"sample/{j}": f"{owners[j].prompt.strip()} -> {texts[j]!r} "
              f"(reward {rewards_N[j]:.0f})"
              for j in range(0, len(owners), g)
            },
          )
        progress.update(step, {"reward": host["rl/reward_mean"], "loss": host["rl/loss"]})
        if step % r.log_every == 0 or step == end_step:
          logging.info(
            "step %d: reward %.3f loss %.4f kl %.3f",
            step,
            host["rl/reward_mean"],
            host["rl/loss"],
            host["rl/kl_estimate"],
          )
        last = host
        requested = stop.requested()
        if step % r.ckpt_every == 0 or step == end_step or requested:
          checkpointer.save(step, state, None, run_config)
        if requested:
          logging.warning("stopped by SIGTERM at step %d; checkpoint saved", step)
          break
  finally:
    checkpointer.wait()
    checkpointer.close()
    progress.close()
    writer.close()
  return last


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
  return float(np.mean(evaluate.rewards_of(problems, texts)))
