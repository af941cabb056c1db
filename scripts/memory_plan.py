"""Per-device memory of post-training on large meshes, without the hardware: ahead-of-time compilation.

The post-training steps (`rl.jit_steps`: prepare and update, the functions posttrain.py trains with) and
the sampler (`sampler.make_generate_fn`) are lowered with abstract inputs (`jax.ShapeDtypeStruct` with their
shardings; nothing is allocated) for a mesh of fake CPU devices the size of the target, compiled, and their
`memory_analysis()` read per device. The reference's parameters use the policy's shardings in
`rl.reference_dtype`.

How the per-device peak is added up. Between steps these buffers stay resident: the post-training state
(policy, AdamW moments, log Z head), the reference, the rollout batch and `prepare`'s output (posttrain.py
keeps the previous step's batch and prepared arrays alive while it samples the next). A step's peak is

    peak = resident + (arguments that are not resident) + (outputs - aliased) + temporaries + code

(the update donates the state, so its new state is aliased and adds nothing; the sampler's prompts are its
only non-resident arguments). The plan's peak is the largest step's.

    python scripts/memory_plan.py --config=configs/math.py:gsm8k --target=all --out=/tmp/plan.md
    python scripts/memory_plan.py --config=configs/math.py:gsm8k --target=v4-32 \
      --config.rl.micro_batches=2 --notarget_overrides

`--target` picks the device count and HBM; unless `--notarget_overrides`, the target's recommended settings
(TARGETS below: the mesh split, micro-batches) are applied on top of the config. XLA:CPU's buffer assignment
is not TPU's or GPU's (fusion, bfloat16 handling, scheduling differ): these are estimates (docs/scaling.md).
`--tpu_compile` compiles the TPU targets with XLA:TPU for their topology instead, still without TPUs
(needs libtpu; see the flag).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trafl_jax import cli  # noqa: E402  (absl only: jax is imported after XLA_FLAGS is set)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
  devices: int  # accelerators (TPU chips, GPUs): one mesh device each
  hbm_gib: float  # memory per device
  overrides: tuple[
    tuple[str, object], ...
  ] = ()  # recommended config settings ("section.key", value)
  note: str = ""
  # --tpu_compile: the TPU topology compiled for without the hardware (jax.experimental.topologies), and
  # settings on top of `overrides` where its devices differ from the target's.
  topology: str = ""
  topology_overrides: tuple[tuple[str, object], ...] = ()
  host_bounds: tuple[
    int, int, int
  ] = ()  # chips per host when the topology is one host (v5e-8, v5e-1)


TARGETS = {
  # 64 chips x 16 GiB. The 48 rows of 8 prompts x 6 do not divide over 64 devices: FSDP over 16 and
  # tensor parallelism over 4 (heads, MLP and vocabulary split; rows 3 per FSDP group).
  "v5e-64": Target(
    64, 16.0, (("mesh.fsdp", 16), ("mesh.tensor", 4)), "TPU v5e, 64 chips", "v5e:8x8"
  ),
  "v5p-32": Target(16, 95.0, (), "TPU v5p, 16 chips (32 TensorCores)", "v5p:2x2x4"),
  # No --tpu_compile for v4: its deviceless topology has one device per TensorCore, and JAX's mesh
  # builder refuses those ("megacore" mode, one device per chip, is what v4 runs with).
  "v4-32": Target(16, 32.0, (), "TPU v4, 16 chips (32 TensorCores)"),
  "h100x8": Target(8, 80.0, (), "8 x H100 80GB (one node)"),
  # One accelerator or one host: what LLaDA-8B with low-rank adapters (configs/math.py:gsm8k_lora)
  # is planned for. The Colab TPU runtimes are one chip.
  "h100": Target(1, 80.0, (), "1 x H100 80GB"),
  "a100_40": Target(1, 40.0, (), "1 x A100 40GB"),
  "v5e-8": Target(8, 16.0, (), "TPU v5e-8 (one host, 8 chips)", "v5e:2x4", host_bounds=(2, 4, 1)),
  "v6e-8": Target(8, 32.0, (), "TPU v6e-8 (one host, 8 chips)", "v6e:2x4", host_bounds=(2, 4, 1)),
  "v5e-1": Target(1, 16.0, (), "TPU v5e-1 (Colab, one chip)", "v5e:1x1", host_bounds=(1, 1, 1)),
  "v6e-1": Target(1, 32.0, (), "TPU v6e-1 (Colab, one chip)", "v6e:1x1", host_bounds=(1, 1, 1)),
}
FIT_FRACTION = 0.9  # headroom for the runtime's own reservations and fragmentation

# Defined when run as a script (the module is also imported by tests, where other modules own --config).
_FLAGS = {}


def _define_flags() -> None:
  _FLAGS["config"] = config_flags.DEFINE_config_file(
    "config", None, "Config file (path[:variant])."
  )
  _FLAGS["target"] = flags.DEFINE_string(
    "target", "all", f"One of {sorted(TARGETS)} or 'all' (comma-separated)."
  )
  _FLAGS["target_overrides"] = flags.DEFINE_bool(
    "target_overrides", True, "Apply the target's recommended settings (TARGETS) to the config."
  )
  _FLAGS["prompt_len"] = flags.DEFINE_integer(
    "prompt_len", 256, "Prompt width (posttrain pads prompts to the longest training prompt)."
  )
  _FLAGS["out"] = flags.DEFINE_string("out", "", "Append the markdown table's rows to this file.")
  _FLAGS["fake_devices"] = flags.DEFINE_bool(
    "fake_devices",
    True,
    "Compile for fake CPU devices (the default: no accelerator needed). --nofake_devices compiles "
    "for this host's own accelerators with their compiler (still nothing allocated): the check of "
    "these estimates on real hardware.",
  )
  _FLAGS["tpu_compile"] = flags.DEFINE_bool(
    "tpu_compile",
    False,
    "Compile the TPU targets with XLA:TPU for their topology, without TPUs (needs libtpu: "
    "pip install 'libtpu==0.0.42.*', the version jax[tpu]==0.10.2 pins). GPU targets are skipped.",
  )
  _FLAGS["steps"] = flags.DEFINE_list(
    "steps",
    ["sampler", "prepare", "update", "evaluate"],
    "Steps to compile (evaluate: the evaluation stage's sampler, a stage of its own).",
  )


def target_names(arg: str) -> list[str]:
  names = sorted(TARGETS) if arg == "all" else [a for a in arg.split(",") if a]
  unknown = [n for n in names if n not in TARGETS]
  if unknown:
    raise ValueError(f"unknown target(s) {unknown}; choose from {sorted(TARGETS)} or 'all'")
  return names


def _device_count_from_argv(argv: list[str]) -> int:
  """The largest target asked for, read before absl parses (XLA_FLAGS must precede importing jax)."""
  arg = "all"
  for i, a in enumerate(argv):
    if a.startswith("--target="):
      arg = a.split("=", 1)[1]
    elif a == "--target" and i + 1 < len(argv):
      arg = argv[i + 1]
  try:
    return max(TARGETS[n].devices for n in target_names(arg))
  except ValueError:
    return 8  # absl reports the bad flag


# ----------------------------------------------------------------------------------------------
# The plan (jax is imported by the functions below, after main() has set XLA_FLAGS)


def size(x: float) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if x >= scale:
      return f"{x / scale:.2f} {unit}"
  return f"{int(x)} B"


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of `ShapeDtypeStruct`s with shardings (the largest shard)."""
  import jax
  import numpy as np

  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def apply_overrides(config, overrides) -> None:
  for key, value in overrides:
    section, name = key.split(".")
    config[section][name] = value


@dataclasses.dataclass
class StepMemory:
  argument: int
  output: int
  alias: int
  temp: int
  code: int
  non_resident_arguments: int  # of `argument`, what is not among the resident buffers (prompts, i)
  compile_s: float

  @property
  def peak_over_resident(self) -> int:
    return self.non_resident_arguments + self.output - self.alias + self.temp + self.code


def _step_memory(compiled, non_resident_arguments: int, compile_s: float) -> StepMemory:
  from trafl_jax import posttrain

  return StepMemory(
    **posttrain.compiled_memory(compiled),
    non_resident_arguments=non_resident_arguments,
    compile_s=compile_s,
  )


def plan(config, devices, prompt_len: int, steps=("sampler", "prepare", "update"), log=print):
  """Compiles the requested steps of `config` on `devices` with abstract inputs and returns a dict of
  per-device bytes: `resident` (and its parts), one `StepMemory` per step, `peak`, and `analytic`.
  The steps and their memory figures come from posttrain.py's own functions (`posttrain.jit_steps`,
  `posttrain.step_memory`): what the loop runs and reports is what is planned."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  from trafl_jax import config_lib, lora, objectives, posttrain, rl, sharding
  from trafl_jax import model as model_lib
  from trafl_jax import state as state_lib

  pcfg = config_lib.posttrain_config(config)
  cfg = config_lib.model_config(config)
  adapters = pcfg.lora.enabled
  model = model_lib.Transformer(pcfg.lora.adapt(cfg))
  layout = config_lib.layout(config)
  mesh, rules = layout.make_mesh(devices), layout.rules
  rows = pcfg.rows
  posttrain.check_rows(pcfg, mesh)
  tx = state_lib.make_optimizer(pcfg.optim)
  abstract_state, shardings = rl.state_shardings(model, tx, pcfg.log_z_lr, pcfg.seed, mesh, rules)
  as_ref = lambda tree: jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, pcfg.reference_dtype, sharding=a.sharding), tree
  )
  if adapters:  # one base (the policy's, in lora.base_dtype) with its adapters; no other reference
    trainable, base = lora.split_trainable(abstract_state.params)
    base = jax.eval_shape(lambda t: lora.prepare_base(t, pcfg.lora.base_dtype), base)
    base = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s.sharding),
      base,
      lora.base_of(abstract_state.params),
    )
    abstract_state = abstract_state.replace(params=lora.combine(base, trainable))
    abstract_ref = None
    ref_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(base))
  else:
    abstract_ref = as_ref(abstract_state.params)
    ref_bytes = cfg.num_params() * jnp.dtype(pcfg.reference_dtype).itemsize
  t = prompt_len + pcfg.scfg.gen_length
  rollout_sh = rl.rollout_shardings(mesh, rules)
  abstract_rollout = objectives.Rollout(
    *(
      jax.ShapeDtypeStruct((rows, t), dtype, sharding=rollout_sh.tokens_NxT)
      for dtype in (jnp.int32, jnp.bool_, jnp.bool_, jnp.bool_)
    ),
    rewards_N=jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=rollout_sh.rewards_N),
    commit_step_NxT=jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=rollout_sh.commit_step_NxT),
  )
  jitted = posttrain.jit_steps(
    model, pcfg, mesh, rules, shardings, None if adapters else shardings.params
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    prepared_shapes = jax.eval_shape(jitted.prepare, abstract_state, abstract_ref, abstract_rollout)
  abstract_prepared = jax.tree.map(
    lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
    prepared_shapes,
    rl.prepared_shardings(mesh, rules),
  )
  prompt_sh = sharding.batch_sharding(mesh, rules)
  abstract_prompts = (
    jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32, sharding=prompt_sh),
    jax.ShapeDtypeStruct((rows, prompt_len), jnp.bool_, sharding=prompt_sh),
  )
  resident = {
    "state": per_device_bytes(abstract_state),
    "reference": per_device_bytes(abstract_ref),
    "batch": per_device_bytes(abstract_rollout),
    "prepared": per_device_bytes(abstract_prepared),
  }
  resident["total"] = sum(resident.values())
  out = {
    "mesh": dict(mesh.shape),
    "devices": mesh.size,
    "rows": rows,
    "seq_len": t,
    "resident": resident,
    "steps": {},
  }
  # XLA drops arguments a step does not read (prepare never reads the optimizer moments), so a step's
  # `argument` size can be below the resident bytes it is passed: count the non-resident ones directly
  # (the sampler's prompts and key; the update's inner index).
  key = jax.random.PRNGKey(0)
  non_resident = {
    "sampler": per_device_bytes(abstract_prompts) + key.size * key.dtype.itemsize,
    "prepare": 0,
    "update": 4,
  }
  memory = posttrain.step_memory(
    jitted,
    mesh,
    rules,
    abstract_state,
    abstract_ref,
    abstract_prompts,
    abstract_rollout,
    abstract_prepared,
    names=tuple(s for s in STEPS if s in steps),
  )
  for name, m in memory.items():
    step = StepMemory(
      **{k: m[k] for k in ("argument", "output", "alias", "temp", "code", "compile_s")},
      non_resident_arguments=non_resident[name],
    )
    out["steps"][name] = step
    log(
      f"  {name:8s} compiled in {step.compile_s:6.1f}s: arguments {size(step.argument)}, "
      f"outputs {size(step.output)}, aliased {size(step.alias)}, temp {size(step.temp)}, "
      f"code {size(step.code)} -> peak {size(resident['total'] + step.peak_over_resident)}"
    )
  out["peak"] = resident["total"] + max(
    (s.peak_over_resident for s in out["steps"].values()), default=0
  )
  if "evaluate" in steps:
    out["evaluate"] = _evaluate_step(
      config, model, mesh, rules, abstract_state.params, prompt_len, log
    )
  n_params, n_dev = cfg.num_params(), mesh.size
  trained = n_params
  if adapters:
    trained = sum(x.size for x in jax.tree.leaves(lora.adapters_of(abstract_state.params)))
  out["analytic"] = {
    "params": n_params,
    "trained_params": trained,
    # the trained parameters f32 + AdamW's two f32 moments + the reference (with adapters: the one
    # base), spread over every device (FSDP x tensor)
    "state_and_reference": (trained * 12 + ref_bytes) / n_dev,
    "gradients": trained * 4 / n_dev,  # the update's largest temporary besides activations
    # the log Z head and its Adam moments are replicated (2 x D x D weights: 0.4 GiB at D = 4096)
    "log_z_head": per_device_bytes((abstract_state.log_z, abstract_state.log_z_opt_state)),
  }
  return out


def _evaluate_step(config, model, mesh, rules, abstract_params, prompt_len: int, log) -> StepMemory:
  """The evaluation stage's sampler (a stage of its own: nothing of post-training stays resident): the
  policy's parameters as the run holds them (float32; a lora run's base in lora.base_dtype) on the run's
  mesh, `eval.batch_size` rows (rounded up to the data devices, as `Generator.generate` does) at the
  longest `eval.gen_lengths`, in the `eval.sampler` modes (micro_batch: rows per pass)."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  from trafl_jax import config_lib, evaluate, sampler, sharding

  eval_cfg = config_lib.eval_config(config)
  settings = evaluate.sampler_settings(eval_cfg, max(config.eval.gen_lengths))
  settings.pop("batch_size")
  scfg = sampler.SamplerConfig(temperature=config.eval.temperature, **settings)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = -(-config.eval.batch_size // shards) * shards
  prompt_sh = sharding.batch_sharding(mesh, rules)
  key = jax.random.PRNGKey(0)
  args = (
    abstract_params,
    jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32, sharding=prompt_sh),
    jax.ShapeDtypeStruct((rows, prompt_len), jnp.bool_, sharding=prompt_sh),
    jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh)),
  )
  param_shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
  generate = sampler.make_generate_fn(model, scfg, mesh, rules, param_shardings).jitted
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = generate.lower(*args).compile()
  step = _step_memory(compiled, per_device_bytes(args), time.perf_counter() - t0)
  log(
    f"  evaluate compiled in {step.compile_s:6.1f}s ({rows} rows, {scfg.gen_length} tokens, "
    f"{scfg.mode}; its own stage): arguments {size(step.argument)}, temp {size(step.temp)}, "
    f"code {size(step.code)} -> peak {size(step.peak_over_resident)}"
  )
  return step


# ----------------------------------------------------------------------------------------------
# Report

STEPS = ("sampler", "prepare", "update")


def _gib(x) -> str:
  return f"{x / GIB:.2f}"


def overall_peak(result: dict) -> int:
  """Post-training's peak or the evaluation stage's, whichever is larger."""
  evaluate = result.get("evaluate")
  return max(result["peak"], evaluate.peak_over_resident if evaluate else 0)


def fits(result: dict, target: Target) -> bool:
  return overall_peak(result) <= FIT_FRACTION * target.hbm_gib * GIB


def settings_of(config) -> str:
  """The settings that move the memory, for the table."""
  m, r, a = config.model, config.rl, config.lora
  ref = f"lora r{a.rank} on a {a.base_dtype} base" if a.rank else f"ref {r.reference_dtype}"
  return (
    f"{r.objective}, {r.prompts_per_step}x{r.group_size} rows, I={r.num_inner_updates}, "
    f"remat {m.remat}, {ref}, M={r.micro_batches}"
  )


def table_header() -> str:
  steps = " | ".join(f"{s} temp / peak" for s in STEPS)
  return (
    f"| target | HBM | mesh (data, fsdp, tensor) | settings | {steps} | resident | analytic "
    "state+ref | evaluation stage peak | peak | fits? |\n" + "|---" * (10 + len(STEPS) - 1) + "|"
  )


def table_row(name: str, target: Target, settings: str, result: dict) -> str:
  """One markdown row; GiB per device."""
  resident = result["resident"]["total"]
  cells = []
  for s in STEPS:
    step = result["steps"].get(s)
    cells.append(
      "-" if step is None else f"{_gib(step.temp)} / {_gib(resident + step.peak_over_resident)}"
    )
  mesh = result["mesh"]
  evaluate = result.get("evaluate")
  return (
    f"| {name} | {target.hbm_gib:g} | ({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) | "
    f"{settings} | {' | '.join(cells)} | {_gib(resident)} | "
    f"{_gib(result['analytic']['state_and_reference'])} | "
    f"{_gib(evaluate.peak_over_resident) if evaluate else '-'} | {_gib(overall_peak(result))} | "
    f"{'yes' if fits(result, target) else '**no**'} |"
  )


def unfit_row(name: str, target: Target, settings: str, reason: str) -> str:
  """A row for a target whose compiler refused a step for lack of memory (no figures to add up)."""
  cells = len(table_header().splitlines()[0].split("|")) - 2
  row = [name, f"{target.hbm_gib:g}", "-", settings, f"compiler: {reason}"]
  row += ["-"] * (cells - len(row) - 1) + ["**no**"]
  return "| " + " | ".join(row) + " |"


def report(name: str, target: Target, result: dict) -> None:
  res, ana = result["resident"], result["analytic"]
  peak, hbm = result["peak"], target.hbm_gib * GIB
  print(
    f"  resident {size(res['total'])} (state {size(res['state'])}, reference "
    f"{size(res['reference'])}, batch {size(res['batch'])}, prepared {size(res['prepared'])}); "
    f"analytic: params f32 + AdamW moments + reference over {result['devices']} devices "
    f"{size(ana['state_and_reference'])} + replicated log Z head {size(ana['log_z_head'])}; "
    f"gradients {size(ana['gradients'])}"
  )
  verdict = "FITS" if fits(result, target) else "DOES NOT FIT"
  if result.get("evaluate"):
    print(f"  evaluation stage peak {size(result['evaluate'].peak_over_resident)}")
    peak = overall_peak(result)
  print(
    f"  {name}: peak {size(peak)} of {target.hbm_gib:g} GiB HBM ({100 * peak / hbm:.0f}%; "
    f"fits at or below {FIT_FRACTION:.0%}): {verdict}",
    flush=True,
  )


def topology_target(target: Target) -> tuple[Target, list]:
  """The target as its deviceless TPU topology presents it, and that topology's devices."""
  from jax.experimental import topologies

  kwargs = {"chips_per_host_bounds": target.host_bounds} if target.host_bounds else {}
  devices = list(topologies.get_topology_desc(target.topology, "tpu", **kwargs).devices)
  per_device = target.hbm_gib * target.devices / len(devices)
  note = f"{target.note}; XLA:TPU, topology {target.topology} ({len(devices)} devices)"
  return dataclasses.replace(
    target,
    devices=len(devices),
    hbm_gib=per_device,
    overrides=target.overrides + target.topology_overrides,
    note=note,
  ), devices


def main(argv):
  del argv
  import jax

  cli.quiet_libraries()
  config = cli.load_config(_FLAGS["config"])
  names = target_names(_FLAGS["target"].value)
  rows = []
  for name in names:
    target = TARGETS[name]
    if _FLAGS["tpu_compile"].value:
      if not target.topology:
        print(f"{name}: skipped (no deviceless topology for --tpu_compile)")
        continue
      target, devices = topology_target(target)
    else:
      devices = jax.devices()[: target.devices]
    c = config.copy_and_resolve_references()
    if _FLAGS["target_overrides"].value:
      apply_overrides(c, target.overrides)
    print(f"{name}: {target.note}, {target.hbm_gib:g} GiB per device; {settings_of(c)}", flush=True)
    if len(devices) < target.devices:
      print(f"  error: {name} needs {target.devices} devices, this host has {len(devices)}")
      continue
    try:
      result = plan(c, devices, _FLAGS["prompt_len"].value, tuple(_FLAGS["steps"].value))
    except ValueError as e:
      print(f"  error: {e}", flush=True)
      continue
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # XLA:TPU refuses to compile a step that does not fit its HBM: that is the answer.
      reason = str(e).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
      print(f"  {name}: DOES NOT FIT ({reason})", flush=True)
      rows.append(unfit_row(name, target, settings_of(c), reason))
      continue
    report(name, target, result)
    rows.append(table_row(name, target, settings_of(c), result))
  print("\n".join([table_header(), *rows]))
  out = _FLAGS["out"].value
  if out and rows:
    new_file = not os.path.exists(out) or os.path.getsize(out) == 0
    with open(out, "a", encoding="utf-8") as f:
      f.write("\n".join(([table_header()] if new_file else []) + rows) + "\n")


if __name__ == "__main__":
  _define_flags()
  if not {"--nofake_devices", "--fake_devices=false", "--fake_devices=False"} & set(sys.argv):
    n = _device_count_from_argv(sys.argv)
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"  # fake CPU devices, even on an accelerator host
  if {"--tpu_compile", "--tpu_compile=true", "--tpu_compile=True"} & set(sys.argv):
    # Deviceless: libtpu must not look for this host's TPU metadata.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
