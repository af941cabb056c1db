"""The config boundary: a run's `ml_collections.ConfigDict` -> the frozen dataclasses every stage takes.

This is the only module that reads config sections. Every conversion names the key it does not know (a
key a config file added that nothing reads is an error, not a silent no-op), and every module below
takes the dataclasses made here and imports nothing from `configs/`.

  model     -> model_lib.ModelSettings (a shape, or "the checkpoint's", plus compute settings)
  mesh, rules -> sharding.Layout
  data, tokenizer, optim, train -> train.TrainConfig
  rl        -> posttrain.PostTrainConfig (objectives.ObjectiveConfig, sampler.SamplerConfig, ...)
  eval      -> evaluate.EvalConfig
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from trafl_jax import evaluate, lora, objectives, posttrain, sampler, sharding, train
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib

SECTIONS = ("seed", "stages", "model", "mesh", "rules", "data", "tokenizer", "optim", "train")
SECTIONS += ("lora", "rl", "eval")

# config.rl, split by who reads it (the rest of its keys are PostTrainConfig's own fields).
_RL_SAMPLER = {
  "gen_length": "gen_length",
  "sample_steps": "steps",
  "block_length": "block_length",
  "temperature": "temperature",
  "remasking": "remasking",
}
_RL_OPTIM = ("lr", "warmup_steps", "weight_decay", "grad_clip")
_RL_TASKS = ("task", "train_path", "eval_path", "train_limit", "eval_problems", "problems_seed")
_RL_PIPELINE = ("reference",)  # read by the pipeline (which checkpoint), not by the loop


def _names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def check_keys(section: str, keys: Iterable[str], known: Iterable[str]) -> None:
  """Every key of `config.<section>` must be one something reads."""
  unknown = sorted(set(keys) - set(known))
  if unknown:
    raise ValueError(
      f"config.{section} has keys nothing reads: {', '.join(unknown)} "
      f"(known: {', '.join(sorted(known))})"
    )


def check_config(config: ml_collections.ConfigDict) -> None:
  """The whole config: no unknown section and no unknown key in any section."""
  check_keys("<top level>", config.keys(), SECTIONS)
  for convert in (model_settings, layout, train_config, lora_config, posttrain_config, eval_config):
    convert(config)


def model_settings(config: ml_collections.ConfigDict) -> model_lib.ModelSettings:
  """`config.model`: preset "checkpoint" leaves every shape field to the checkpoint."""
  m = config.model
  check_keys(
    "model", m.keys(), set(model_lib.SHAPE_FIELDS) | set(model_lib.COMPUTE_FIELDS) | {"preset"}
  )
  follow = m.preset == "checkpoint"
  shape = tuple((k, model_lib.FOLLOW if follow else m[k]) for k in model_lib.SHAPE_FIELDS if k in m)
  return model_lib.ModelSettings(
    shape=shape, **{k: m[k] for k in model_lib.COMPUTE_FIELDS if k in m}
  )


def model_config(config: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  """The model a stage builds from scratch (reference training, benchmarks, the memory plan)."""
  return model_settings(config).build()


def layout(config: ml_collections.ConfigDict) -> sharding.Layout:
  mesh = config.mesh.to_dict()
  check_keys("mesh", mesh, sharding.MESH_AXES)
  return sharding.Layout(
    mesh=tuple((k, int(v)) for k, v in mesh.items()),
    rules=sharding.rules_from_config(config.rules.to_dict()),
  )


def optim_config(config: ml_collections.ConfigDict) -> state_lib.OptimConfig:
  """Reference training's AdamW (`config.optim`, over `config.train.num_steps`)."""
  o = config.optim.to_dict()
  check_keys("optim", o, _names(state_lib.OptimConfig) - {"total_steps"})
  return state_lib.OptimConfig(total_steps=config.train.num_steps, **o)


def train_config(config: ml_collections.ConfigDict) -> train.TrainConfig:
  d, t, tok = config.data.to_dict(), config.train.to_dict(), config.tokenizer.to_dict()
  check_keys("data", d, _names(train.DataConfig))
  check_keys("tokenizer", tok, ("kind", "path"))
  check_keys(
    "train",
    t,
    _names(train.TrainConfig) - {"seed", "data", "optim", "tokenizer_kind", "tokenizer_path"},
  )
  return train.TrainConfig(
    seed=config.seed,
    data=train.DataConfig(**d),
    optim=optim_config(config),
    tokenizer_kind=tok["kind"],
    tokenizer_path=tok["path"],
    **t,
  )


def objective_config(config: ml_collections.ConfigDict) -> objectives.ObjectiveConfig:
  """The objective's settings and the rollouts' sampler (the trajectory estimator scores its paths)."""
  r = config.rl
  own = _names(objectives.ObjectiveConfig) - {"rollout"}
  return objectives.ObjectiveConfig(**{k: r[k] for k in own}, rollout=sampler_config(config))


def sampler_modes(section: str, modes: ml_collections.ConfigDict) -> dict[str, Any]:
  """A sampler section (`rl.rollout`, `eval.sampler`: its speed modes and draw settings) as
  SamplerConfig's keyword arguments."""
  d = modes.to_dict()
  check_keys(section, d, sampler.SECTION_FIELDS)
  return d


def sampler_config(config: ml_collections.ConfigDict) -> sampler.SamplerConfig:
  r = config.rl
  return sampler.SamplerConfig(
    **{ours: r[key] for key, ours in _RL_SAMPLER.items()},
    **sampler_modes("rl.rollout", r.rollout),
  )


def rl_optim_config(config: ml_collections.ConfigDict) -> state_lib.OptimConfig:
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


def _countdown(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Generated Countdown problems look like the reference's training data (the data section)."""
  return dict(
    countdown_numbers=config.data.countdown_numbers,
    countdown_max_number=config.data.countdown_max_number,
  )


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig:
  """`config.lora`: post-training's low-rank adapters (rank 0: full post-training)."""
  d = config.lora.to_dict()
  check_keys("lora", d, _names(lora.LoraConfig))
  return lora.LoraConfig(**d)


def posttrain_config(config: ml_collections.ConfigDict) -> posttrain.PostTrainConfig:
  r = config.rl
  own = _names(posttrain.PostTrainConfig) - {
    "ocfg",
    "scfg",
    "optim",
    "train_problems",
    "test_problems",
    "seed",
    "progress",
    "lora",
  }
  known = (
    own | (_names(objectives.ObjectiveConfig) - {"rollout"}) | set(_RL_SAMPLER) | set(_RL_OPTIM)
  )
  check_keys("rl", r.keys(), known | set(_RL_TASKS) | set(_RL_PIPELINE) | {"num_steps", "rollout"})
  train_problems = posttrain.ProblemSource(
    task=r.task,
    split="train",
    path=r.train_path or None,
    limit=r.train_limit or None,
    seed=config.seed if r.problems_seed < 0 else r.problems_seed,
    **_countdown(config),
  )
  test_problems = dataclasses.replace(
    train_problems, split="test", path=r.eval_path or None, limit=r.eval_problems
  )
  return posttrain.PostTrainConfig(
    ocfg=objective_config(config),
    scfg=sampler_config(config),
    optim=rl_optim_config(config),
    train_problems=train_problems,
    test_problems=test_problems,
    seed=config.seed,
    progress=config.train.progress,
    lora=lora_config(config),
    **{k: r[k] for k in own},
  )


def eval_config(config: ml_collections.ConfigDict) -> evaluate.EvalConfig:
  """The config's `eval` section as plain values."""
  e = config.eval.to_dict()
  check_keys("eval", e, _names(evaluate.EvalConfig) - set(_countdown(config)))
  e["limit"] = e["limit"] or None
  e["tasks"] = tuple(e["tasks"])
  e["gen_lengths"] = tuple(int(x) for x in e["gen_lengths"])
  r = e["remasking"]
  e["remasking"] = (r,) if isinstance(r, str) else tuple(r)
  e["sampler"] = sampler_modes("eval.sampler", config.eval.sampler)
  return evaluate.EvalConfig(**e, **_countdown(config))


def record(config: ml_collections.ConfigDict, model: model_lib.ModelConfig | None = None) -> dict:
  """The config a stage ran with, as JSON-able values; `model` (the checkpoint's shape merged with the
  config's compute settings) replaces the config's model section when given."""
  out = config.to_dict()
  if model is not None:
    out["model"] = {"preset": config.model.preset, **dataclasses.asdict(model)}
  return _jsonable(out)


def _jsonable(value):
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value
