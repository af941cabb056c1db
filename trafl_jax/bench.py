"""Benchmarks that print one JSON line.

  python -m trafl_jax.bench train --preset=small
  python -m trafl_jax.bench sample --preset=small     (gen_length 256, steps 128, block 32, batch 32)
  python -m trafl_jax.bench sample --preset=small --cache=dual --threshold=0.9 --stop_at_eos
      (a fast mode, and the exact sampler timed in the same process: speedup_vs_exact, model
      evaluations per token, the fraction of greedy tokens equal to the exact sampler's)
  python -m trafl_jax.bench rl --preset=small --gen_length=128 --sample_steps=64
      (one outer step per objective: sampling, scoring, update; 8 prompts x 8 samples; model FLOP rates
      and fractions of peak for the sampler and for prepare + update)

`fraction_of_peak` compares the model FLOP rate (train: forward + backward = 3x the forward FLOPs, no remat
recompute counted; sample: one forward over the whole sequence per denoising step, head on the completion
only) with a large matmul timed in the same process (float32; bfloat16 on accelerators for bfloat16 runs).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn

from trafl_jax import cli, jsonl, lora, objectives, posttrain, rl, sample, sampler, sharding
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib
from trafl_jax import tasks as tasks_lib
from trafl_jax import train as train_lib

_PRESET = flags.DEFINE_string("preset", "small", "Model size preset (model.PRESETS).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "train: tokens per row (a quarter of them prompt).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "sample: prompt tokens per row.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 256, "sample: completion length.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 128, "sample: denoising steps.")
_BLOCK = flags.DEFINE_integer("block_length", 32, "sample: block length.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "Parameter dtype.")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Scan over the layers (else unrolled).")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Mesh fsdp axis (the rest of the devices: data).")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Mesh tensor axis.")
_OBJECTIVE = flags.DEFINE_list("objective", list(objectives.OBJECTIVES), "rl: objectives to time.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "rl: prompts per step.")
_GROUP = flags.DEFINE_integer("group", 8, "rl: samples per prompt.")
_INNER = flags.DEFINE_integer("inner_updates", 1, "rl: optimizer steps per rollout batch.")
_CACHE = flags.DEFINE_enum(
  "cache", "none", list(sampler.CACHES), "sample, rl: the sampler's cache."
)
_REFRESH = flags.DEFINE_integer(
  "refresh_every", 0, "sample, rl: cache refresh (steps; 0: per block)."
)
_THRESHOLD = flags.DEFINE_float(
  "threshold", 0.0, "sample, rl: confidence threshold (0: LLaDA's counts)."
)
_FLOOR = flags.DEFINE_enum(
  "threshold_floor",
  "one",
  list(sampler.THRESHOLD_FLOORS),
  "sample, rl: a thresholded step commits at least one position, or the exact schedule's count.",
)
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", False, "sample, rl: finished rows stop computing.")
_MICRO = flags.DEFINE_integer("micro_batch", 0, "sample, rl: sampler rows per pass (0: all).")
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", "", "sample: a trained model instead of random weights (with --prompts_path)."
)
_PROMPTS_PATH = flags.DEFINE_string(
  "prompts_path", "", "sample: GSM8K-format JSONL whose first --batch questions are the prompts."
)
_LORA = flags.DEFINE_integer(
  "lora_rank", 0, "rl: also time adapters of this rank (q, k, v) beside full post-training."
)
_MATMUL_N = flags.DEFINE_integer("matmul_n", 4096, "Side of the square matmul that measures peak.")


def _best_time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak_flops(n: int, dtype=jnp.float32) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  return 2.0 * n**3 / _best_time(lambda: mm(a, b), 5)


def _model(preset: str, dtype: str, remat: str = "none"):
  """The preset's shape with the compute settings: dtype and remat, and (on the command line)
  --param_dtype and --scan_layers."""
  if preset not in model_lib.PRESETS or preset == "checkpoint":
    raise app.UsageError(f"--preset={preset}: choose from {sorted(model_lib.PRESETS)}")
  parsed = flags.FLAGS.is_parsed()
  settings = model_lib.ModelSettings(
    shape=tuple(model_lib.PRESETS[preset].items()),
    dtype=dtype,
    param_dtype=_PARAM_DTYPE.value if parsed else "float32",
    remat=remat,
    scan_layers=_SCAN.value if parsed else True,
  )
  cfg = settings.build()
  return cfg, model_lib.Transformer(cfg)


def _layout() -> sharding.Layout:
  """Data parallel over every device, or --fsdp / --tensor on the command line."""
  if not flags.FLAGS.is_parsed():
    return sharding.Layout()
  return sharding.Layout(mesh=(("data", -1), ("fsdp", _FSDP.value), ("tensor", _TENSOR.value)))


def _describe(bench: str, preset: str, cfg, batch: int, dtype: str) -> dict:
  return {
    "bench": bench,
    "preset": preset,
    "params": cfg.num_params(),
    "batch": batch,
    "dtype": dtype,
    "devices": jax.device_count(),
    "platform": jax.devices()[0].platform,
  }


def bench_train(preset: str, batch: int, seq_len: int, steps: int, dtype: str, remat: str) -> dict:
  cfg, model = _model(preset, dtype, remat)
  ocfg = state_lib.OptimConfig(1e-4, "constant", 0, 0.1, 0.01, 0.9, 0.99, 1e-8, 1.0, steps + 1)
  tx = state_lib.make_optimizer(ocfg)
  layout = _layout()
  mesh, rules = layout.make_mesh(), layout.rules
  state, shardings = state_lib.create_sharded_state(
    model, tx, jax.random.PRNGKey(0), seq_len, mesh, rules
  )
  prompt_len = min(64, seq_len // 4)
  rng = np.random.default_rng(0)
  local = {
    "tokens": rng.integers(5, cfg.vocab_size, (batch, seq_len)).astype(np.int32),
    "valid": np.ones((batch, seq_len), bool),
    "completion": np.broadcast_to(np.arange(seq_len) >= prompt_len, (batch, seq_len)).copy(),
  }
  shapes = {k: (v.shape, v.dtype) for k, v in local.items()}
  step = train_lib.compile_train_step(
    model, state_lib.learning_rate_schedule(ocfg), 1e-3, state, shardings, shapes, mesh, rules
  )
  batch_arrays = sharding.global_batch(local, mesh, rules)
  state, m = step(state, batch_arrays)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch_arrays)
  jax.block_until_ready((state, m))
  seconds = (time.perf_counter() - start) / steps
  tokens = batch * seq_len
  flops = 3.0 * model_lib.forward_flops(cfg, batch, seq_len)
  return _describe("train", preset, cfg, batch, dtype) | {
    "seq_len": seq_len,
    "remat": remat,
    "step_s": seconds,
    "tokens_per_s": tokens / seconds,
    "flops_per_s": flops / seconds,
  }


def bench_sample(
  preset: str,
  batch: int,
  prompt_len: int,
  scfg: sampler.SamplerConfig,
  dtype: str,
  repeats: int,
  checkpoint: str = "",
  prompts_path: str = "",
) -> dict:
  """Generated tokens per second of the jitted sampler (params replicated, batch over the devices),
  greedy. A mode other than exact is timed beside the exact sampler in the same process, on the same
  weights and prompts: `speedup_vs_exact`, and `agreement` (the fraction of tokens equal to the exact
  sampler's). Random weights and prompts, or a trained `checkpoint` with the first `batch` questions
  of a GSM8K-format file (`prompts_path`), left-padded to `prompt_len`; then `answer_agreement` (the
  fraction of rows whose text up to the first EOS equals the exact sampler's) and, for a GSM8K JSONL,
  each sampler's greedy accuracy on those questions."""
  layout = _layout()
  mesh, rules = layout.make_mesh(), layout.rules
  generator = None
  if checkpoint:
    generator = sample.Generator.load(checkpoint, dtype=dtype, layout=layout)
    cfg, model, params = generator.cfg, generator.model, generator.params
    questions = sample.read_prompts(prompts_path)[:batch]
    prompt, valid = generator.pad_prompts(
      [generator.encode(q) for q in questions], batch, prompt_len
    )
  else:
    cfg, model = _model(preset, dtype)
    params = state_lib.init_params(model, jax.random.PRNGKey(0), prompt_len + scfg.gen_length)
    shardings = sharding.logical_to_shardings(nn.get_partition_spec(params), mesh, rules)
    params = jax.device_put(nn.unbox(params), shardings)
    rng = np.random.default_rng(0)
    prompt = rng.integers(5, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    valid = np.ones((batch, prompt_len), bool)
  shardings = jax.tree.map(lambda x: x.sharding, params)

  def timed(c: sampler.SamplerConfig):
    generate = sampler.make_generate_fn(model, c, mesh, rules, shardings)
    out = jax.block_until_ready(generate(params, prompt, valid, jax.random.PRNGKey(0)))
    seconds = _best_time(lambda: generate(params, prompt, valid, jax.random.PRNGKey(1)), repeats)
    return seconds, out

  seconds, out = timed(scfg)
  seq_len = prompt_len + scfg.gen_length
  flops = scfg.steps * model_lib.forward_flops(cfg, batch, seq_len, logits_len=scfg.gen_length)
  nfe = np.asarray(sharding.to_host(out.nfe_B), np.float64)
  result = _describe("sample", preset, cfg, batch, dtype) | {
    "prompt_len": prompt_len,
    "gen_length": scfg.gen_length,
    "steps": scfg.steps,
    "block_length": scfg.block_length,
    "mode": scfg.mode,
    "call_s": seconds,
    "tokens_per_s": batch * scfg.gen_length / seconds,
    "nfe_per_token": float(nfe.mean() / scfg.gen_length),
    # The exact sampler's FLOPs per call: a fast mode's rate is in equivalent (saved) FLOPs.
    "flops_per_s": flops / seconds,
  }
  if not scfg.exact:
    exact_cfg = dataclasses.replace(
      scfg, cache="none", refresh_every=0, threshold=0.0, stop_at_eos=False
    )
    exact_s, exact = timed(exact_cfg)
    same = sharding.to_host(out.completion_BxL) == sharding.to_host(exact.completion_BxL)
    if generator is not None:
      texts = [generator.decode(c) for c in sharding.to_host(out.completion_BxL)]
      exact_texts = [generator.decode(c) for c in sharding.to_host(exact.completion_BxL)]
      result["answer_agreement"] = float(np.mean([a == b for a, b in zip(texts, exact_texts)]))
      result["checkpoint"] = checkpoint
      if _has_answers(prompts_path):  # GSM8K's gold answers: each sampler's greedy accuracy
        problems = tasks_lib.load("gsm8k", path=prompts_path)[:batch]
        for key, done in (("greedy_accuracy", texts), ("exact_greedy_accuracy", exact_texts)):
          result[key] = float(np.mean(tasks_lib.rewards(problems, done)))
    result |= {
      "exact_call_s": exact_s,
      "exact_tokens_per_s": batch * scfg.gen_length / exact_s,
      "speedup_vs_exact": exact_s / seconds,
      "agreement": float(np.mean(same)),
    }
  return result


def _has_answers(path: str) -> bool:
  """A JSONL of GSM8K records (question and `#### N` answer), not prompts alone."""
  records = jsonl.read(path) if path.endswith(".jsonl") else []
  return bool(records) and {"question", "answer"} <= records[0][1].keys()


def rl_step_flops(cfg, ocfg, prompts: int, group: int, seq_len: int, inner: int) -> float:
  """Model FLOPs of `prepare` + `inner` updates: the policy and the reference score K masked copies
  (one for diffu_grpo), each update runs forward + backward (3x) on them, and TraFL's learned log Z adds
  one forward per prompt."""
  n = prompts * group
  copies = objectives.estimator_of(ocfg).forward_passes(ocfg)
  fwd = model_lib.forward_flops(cfg, n, seq_len)
  flops = inner * 2 * copies * fwd + inner * 3 * copies * fwd
  if objectives.learned_log_z(ocfg):
    flops += inner * model_lib.forward_flops(cfg, prompts, seq_len)
  return float(flops)


def bench_rl(
  preset: str,
  objective: str,
  prompts: int,
  group: int,
  prompt_len: int,
  scfg: sampler.SamplerConfig,
  inner: int,
  dtype: str = "float32",
  remat: str = "none",
  repeats: int = 2,
  lora_rank: int = 0,
) -> dict:
  """One post-training outer step, split into sampling, scoring (the Countdown verifier on as many
  completions) and the update(s), with random weights and prompts, through the jitted functions the
  post-training loop uses (`rl.jit_steps`, `sampler.make_generate_fn`), and the compiled per-device
  memory of prepare and update. `lora_rank`: d1's adapters (q, k, v; alpha = rank / 2) on a base in
  the compute dtype, the reference the base with them off; the sampler then also timed on the adapters
  merged into the base (`sample_merged_s`, the merge included)."""
  cfg, model = _model(preset, dtype, remat)
  adapters = (
    lora.LoraConfig(rank=lora_rank, alpha=lora_rank / 2) if lora_rank else lora.LoraConfig()
  )
  model = model_lib.Transformer(adapters.adapt(cfg))
  layout = _layout()
  mesh, rules = layout.make_mesh(), layout.rules
  ocfg = objectives.ObjectiveConfig(objective=objective)
  state, ref_params, shardings = _rl_state(model, dtype, mesh, rules)
  n = prompts * group
  rng = np.random.default_rng(0)
  prompt = np.repeat(rng.integers(5, cfg.vocab_size, (prompts, prompt_len)), group, 0).astype(
    np.int32
  )
  valid = np.ones_like(prompt, bool)
  generate = sampler.make_generate_fn(model, scfg, mesh, rules, shardings.params)
  ref_shardings = None if ref_params is None else shardings.params
  prepare, update, _ = rl.jit_steps(
    model, ocfg, inner, group, shardings, ref_shardings, mesh, rules
  )
  problems = tasks_lib.load("countdown", limit=n)
  texts = [f"{p.reference['numbers'][0]}+{p.reference['numbers'][1]}" for p in problems]
  times = {"sample_s": [], "score_s": [], "update_s": []}
  for _ in range(1 + repeats):  # the first is compilation
    t0 = time.perf_counter()
    out = generate(state.params, prompt, valid, jax.random.PRNGKey(3))
    completion = sharding.to_host(out.completion_BxL)
    commit_step = sharding.to_host(out.commit_step_BxL)
    t1 = time.perf_counter()
    rewards = np.asarray(tasks_lib.rewards(problems, texts), np.float32)
    t2 = time.perf_counter()
    batch = sharding.global_batch(
      posttrain.assemble_rollout(prompt, valid, completion, rewards, commit_step), mesh, rules
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      prepared = prepare(state, ref_params, batch)
      for i in range(inner):
        state, m = update(state, batch, prepared, i)
      jax.block_until_ready(m)
    t3 = time.perf_counter()
    for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
      times[key].append(value)
  out = {k: float(np.min(v[1:])) for k, v in times.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for name, fn, args in (
      ("prepare", prepare, (state, ref_params, batch)),
      ("update", update, (state, batch, prepared, 0)),
    ):
      memory = posttrain.compiled_memory(fn.lower(*args).compile())
      out[f"{name}_peak_bytes"] = memory["argument"] + memory["output"] - memory["alias"]
      out[f"{name}_peak_bytes"] += memory["temp"]
  if lora_rank:
    merged = _merged_generate(model, scfg, mesh, rules, shardings.params)
    out["sample_merged_s"] = _best_time(
      lambda: sharding.to_host(merged(state.params, prompt, valid).completion_BxL), repeats + 1
    )
  trained = lora.split_trainable(state.params)[0]
  seq_len = prompt_len + scfg.gen_length
  sample_flops = scfg.steps * model_lib.forward_flops(cfg, n, seq_len, logits_len=scfg.gen_length)
  update_flops = rl_step_flops(cfg, ocfg, prompts, group, seq_len, inner)
  return _describe("rl", preset, cfg, n, dtype) | {
    "objective": objective,
    "prompts": prompts,
    "group": group,
    "prompt_len": prompt_len,
    "gen_length": scfg.gen_length,
    "steps": scfg.steps,
    "mode": scfg.mode,
    "inner_updates": inner,
    "remat": remat,
    "lora_rank": lora_rank,
    "trained_params": int(sum(x.size for x in jax.tree.leaves(trained))),
    "state_bytes": int(sum(x.nbytes for x in jax.tree.leaves((state, ref_params)))),
    **out,
    "outer_step_s": out["sample_s"] + out["score_s"] + out["update_s"],
    "sample_tokens_per_s": n * scfg.gen_length / out["sample_s"],
    "update_tokens_per_s": n * seq_len * inner / out["update_s"],
    "sample_flops_per_s": sample_flops / out["sample_s"],
    "update_flops_per_s": update_flops / out["update_s"],
  }


def _merged_generate(model, scfg: sampler.SamplerConfig, mesh, rules, param_shardings):
  """`(params with adapters, prompt, valid) -> Generation` of the other way to sample an adapted model:
  every adapter folded into its kernel first (`lora.merged`, once per rollout batch, timed with it),
  then the base model's sampler."""
  merge = jax.jit(
    functools.partial(lora.merged, cfg=model.cfg), out_shardings=lora.base_of(param_shardings)
  )
  base = model_lib.Transformer(lora.base_config(model.cfg))
  generate = sampler.make_generate_fn(base, scfg, mesh, rules, lora.base_of(param_shardings))
  return lambda params, prompt, valid: generate(merge(params), prompt, valid, jax.random.PRNGKey(3))


def _rl_state(model, dtype: str, mesh, rules):
  """`(state, ref_params, shardings)` from random weights: without adapters the policy in float32 and a
  reference copy in `dtype`; with them one base in `dtype` plus the adapters (`ref_params` None)."""
  tx = state_lib.make_optimizer(
    state_lib.OptimConfig(1e-5, "constant", 0, 1.0, 0.0, 0.9, 0.99, 1e-8, 1.0, 10)
  )
  _, shardings = rl.state_shardings(model, tx, 1e-3, 1, mesh, rules)
  create = functools.partial(
    rl.create_state, tx=tx, log_z_lr=1e-3, d_model=model.cfg.d_model, seed=1
  )
  cast = lambda p: jax.tree.map(lambda x: x.astype(dtype), p)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(
      lambda: nn.unbox(state_lib.init_params(model, jax.random.PRNGKey(0), 8)),
      out_shardings=shardings.params,
    )()
    if model.cfg.lora_rank:
      trainable, base = lora.split_trainable(params)
      params, ref_params = lora.combine(cast(base), trainable), None
    else:
      ref_params = jax.jit(cast, out_shardings=shardings.params)(params)
    state = jax.jit(create, out_shardings=shardings, donate_argnums=0)(params)
  return state, ref_params, shardings


def _peak(dtype: str) -> tuple[float, str]:
  """The matmul rate the model FLOP rates are compared with (bfloat16 on accelerators for bf16 runs)."""
  bf16 = jax.devices()[0].platform != "cpu" and dtype == "bfloat16"
  return matmul_peak_flops(_MATMUL_N.value, jnp.bfloat16 if bf16 else jnp.float32), (
    "bfloat16" if bf16 else "float32"
  )


def _modes() -> dict:
  return dict(
    cache=_CACHE.value,
    refresh_every=_REFRESH.value,
    threshold=_THRESHOLD.value,
    threshold_floor=_FLOOR.value,
    stop_at_eos=_STOP_AT_EOS.value,
    micro_batch=_MICRO.value,
  )


def main(argv):
  cli.quiet_libraries()
  if len(argv) != 2 or argv[1] not in ("train", "sample", "rl"):
    raise app.UsageError("usage: python -m trafl_jax.bench train|sample|rl [--preset=small ...]")
  if argv[1] == "rl":
    scfg = sampler.SamplerConfig(
      gen_length=_GEN_LENGTH.value,
      steps=_SAMPLE_STEPS.value,
      block_length=_BLOCK.value,
      temperature=1.0,
      **_modes(),
    )
    peak, peak_dtype = _peak(_DTYPE.value)
    # Adapters first: their line is printed even where full post-training then runs out of memory.
    ranks = (_LORA.value, 0) if _LORA.value else (0,)
    for objective, rank in itertools.product(_OBJECTIVE.value, ranks):
      result = bench_rl(
        _PRESET.value,
        objective,
        _PROMPTS.value,
        _GROUP.value,
        _PROMPT_LEN.value,
        scfg,
        _INNER.value,
        _DTYPE.value,
        _REMAT.value,
        lora_rank=rank,
      )
      result |= {"matmul_peak_flops_per_s": peak, "matmul_dtype": peak_dtype}
      result["sample_fraction_of_peak"] = result["sample_flops_per_s"] / peak
      result["update_fraction_of_peak"] = result["update_flops_per_s"] / peak
      print(json.dumps(result))
    return
  if argv[1] == "train":
    result = bench_train(
      _PRESET.value, _BATCH.value, _SEQ_LEN.value, _STEPS.value, _DTYPE.value, _REMAT.value
    )
  else:
    scfg = sampler.SamplerConfig(
      gen_length=_GEN_LENGTH.value,
      steps=_SAMPLE_STEPS.value,
      block_length=_BLOCK.value,
      **_modes(),
    )
    result = bench_sample(
      _PRESET.value,
      _BATCH.value,
      _PROMPT_LEN.value,
      scfg,
      _DTYPE.value,
      1,
      _CHECKPOINT.value,
      _PROMPTS_PATH.value,
    )
  peak, peak_dtype = _peak(_DTYPE.value)
  result |= {"matmul_peak_flops_per_s": peak, "matmul_dtype": peak_dtype}
  result["fraction_of_peak"] = result["flops_per_s"] / peak
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
