"""The run's config reaches every stage: the checkpoint gives the model's shape, the config how it is
computed (dtype, remat, scan) and sharded (mesh, rules), checked on the compiled functions the loop and
the evaluation run; the config each stage ran is written beside it; the memory plan's figures are the
loop's own; the config boundary names what it does not know."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import math as math_config
from trafl_jax import config_lib, evaluate, loop, pipeline, posttrain, sample, sharding
from trafl_jax import model as model_lib

from .conftest import ROOT

_spec = importlib.util.spec_from_file_location("memory_plan", ROOT / "scripts" / "memory_plan.py")
memory_plan = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("memory_plan", memory_plan)
_spec.loader.exec_module(memory_plan)


def _config(**overrides):
  """tiny, one post-training step, FSDP over the 8 devices, no in-loop evaluation."""
  config = math_config.get_config("tiny")
  with config.unlocked():
    config.train.progress = False
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.rl.num_steps, config.rl.eval_every = 1, 0
    config.rl.prompts_per_step, config.rl.group_size = 4, 2
    for key, value in overrides.items():
      section, name = key.split(".")
      config[section][name] = value
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("run_config") / "reference")
  pipeline.reference_stage(_config(), path)
  return path


@pytest.fixture(scope="module")
def compiled(reference, tmp_path_factory):
  """Per config variant: the compiled post-training steps the real loop ran (captured where the loop
  asks XLA for their memory), its memory.json and config.json."""
  variants = {
    "default": {},
    "remat_bf16": {"model.remat": "full", "model.dtype": "bfloat16"},
    "rules": {"rules.embed": None},  # parameters replicated instead of split over fsdp
  }
  out = {}
  original = posttrain.compiled_memory
  for name, overrides in variants.items():
    seen = {}

    def capture(fn, seen=seen):
      seen[len(seen)] = fn
      return original(fn)

    posttrain.compiled_memory = capture
    try:
      workdir = str(tmp_path_factory.mktemp(name))
      pipeline.posttrain_stage(_config(**overrides), workdir, reference)
    finally:
      posttrain.compiled_memory = original
    with open(os.path.join(workdir, posttrain.MEMORY_FILE)) as f:
      memory = json.load(f)
    with open(os.path.join(workdir, loop.CONFIG_FILE)) as f:
      config_json = json.load(f)
    out[name] = dict(zip(("sampler", "prepare", "update"), seen.values()), memory=memory)
    out[name]["config"] = config_json
  return out


def _param_specs(executable):
  """The PartitionSpecs of the parameters among a compiled step's inputs (its first argument: the
  state, or the sampler's parameters)."""
  first = executable.input_shardings[0][0]
  return {str(s.spec) for s in jax.tree.leaves(getattr(first, "params", first))}


def test_dtype_and_remat_reach_the_compiled_posttraining_steps(compiled):
  default, changed = compiled["default"], compiled["remat_bf16"]
  for step in ("sampler", "prepare", "update"):
    assert "bf16" not in default[step].as_text(), step
    assert "bf16" in changed[step].as_text(), step  # bfloat16 compute in every step
  # remat=full: the update recomputes the forward in the backward instead of keeping activations.
  assert changed["memory"]["update"]["temp"] < default["memory"]["update"]["temp"]
  model = changed["config"]["model"]
  assert (model["dtype"], model["remat"], model["n_layers"]) == ("bfloat16", "full", 2)


def test_rules_reach_the_compiled_posttraining_steps(compiled):
  default, replicated = compiled["default"], compiled["rules"]
  for step in ("prepare", "update"):
    assert any("fsdp" in spec for spec in _param_specs(default[step])), step
    assert not any("fsdp" in spec for spec in _param_specs(replicated[step])), step
  # Replicated parameters: every device holds all of them.
  assert replicated["memory"]["update"]["argument"] > default["memory"]["update"]["argument"]
  assert replicated["config"]["rules"]["embed"] is None


def test_settings_and_rules_reach_the_evaluation_sampler(reference, tmp_path, monkeypatch):
  config = _config(**{"model.dtype": "bfloat16", "model.remat": "full", "rules.embed": None})
  loaded = []
  original = evaluate.evaluate_checkpoint
  monkeypatch.setattr(
    evaluate,
    "evaluate_checkpoint",
    lambda g, *a, **k: loaded.append(g) or original(g, *a, **k),
  )
  pipeline.evaluate_stage(config, [reference], str(tmp_path / "eval"), ["ref"], False)
  [generator] = loaded
  assert (generator.cfg.dtype, generator.cfg.remat) == ("bfloat16", "full")
  assert len(generator._fns) == 2  # the samplers the evaluation ran: greedy and sampled
  prompt = np.zeros((8, 8), np.int32)
  args = (generator.params, prompt, prompt == 0, jax.random.PRNGKey(0))
  for fn in generator._fns.values():
    executable = fn.jitted.lower(*args).compile()
    assert "bf16" in executable.as_text()
    assert not any("fsdp" in spec for spec in _param_specs(executable))
  with open(tmp_path / "eval" / loop.CONFIG_FILE) as f:
    written = json.load(f)
  assert written["models"]["ref"]["dtype"] == "bfloat16" and written["rules"]["embed"] is None


def test_memory_plan_is_what_the_loop_compiled(reference, compiled):
  config = _config()
  ref = sample.Generator.load(reference)
  width = posttrain.Prompts.encode(ref, config_lib.posttrain_config(config).train_problems.load())
  plan = memory_plan.plan(config, jax.devices(), width.width, log=lambda _: None)
  loop_memory = compiled["default"]["memory"]
  for step in ("sampler", "prepare", "update"):
    planned = plan["steps"][step]
    for key in ("argument", "output", "alias", "temp", "code"):
      assert getattr(planned, key) == loop_memory[step][key], (step, key)


def test_a_shape_the_checkpoint_does_not_have_is_named(reference, tmp_path):
  with pytest.raises(ValueError, match=r"n_layers: config 3 vs checkpoint 2"):
    pipeline.posttrain_stage(_config(**{"model.n_layers": 3}), str(tmp_path / "a"), reference)
  assert not os.path.exists(tmp_path / "a" / "checkpoints")
  # preset "checkpoint" follows the checkpoint whatever the shape fields say.
  config = _config(**{"model.preset": "checkpoint", "model.n_layers": 3, "model.d_model": 8})
  settings = config_lib.model_settings(config)
  generator = sample.Generator.load(reference, settings=settings)
  assert (generator.cfg.n_layers, generator.cfg.d_model) == (2, 64)
  with pytest.raises(ValueError, match="builds a new model"):
    config_lib.model_config(config)


def test_each_stage_writes_the_config_it_ran(reference, compiled):
  with open(os.path.join(reference, loop.CONFIG_FILE)) as f:
    written = json.load(f)
  assert written["model"]["preset"] == "tiny" and written["train"]["num_steps"] == 20
  assert written["mesh"] == {"data": 1, "fsdp": -1, "tensor": 1}
  # A Hugging Face-style config.json is a model directory's; a stage's own is not taken for one.
  assert sample.Generator.load(reference).cfg.n_layers == 2


def test_layer_layout_follows_the_config(reference):
  stacked = sample.Generator.load(reference)
  layout = model_lib.ModelSettings(shape=(), scan_layers=False)
  unrolled = sample.Generator.load(reference, settings=layout)
  assert "blocks" in stacked.params and "blocks_1" in unrolled.params
  tokens = np.arange(5, 13, dtype=np.int32)[None]
  a = stacked.model.apply({"params": stacked.params}, tokens, tokens > 0)
  b = unrolled.model.apply({"params": unrolled.params}, tokens, tokens > 0)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("section", ["rl", "model", "eval", "data", "train", "optim", "mesh"])
def test_the_boundary_names_a_key_nothing_reads(section):
  config = math_config.get_config("tiny")
  with config.unlocked():
    config[section]["not_a_setting"] = 1
  with pytest.raises(ValueError, match=rf"config\.{section} has keys nothing reads: not_a_setting"):
    config_lib.check_config(config)


def test_the_boundary_names_an_unknown_section():
  config = math_config.get_config("tiny")
  with config.unlocked():
    config.extra = ConfigDict({"x": 1})
  with pytest.raises(ValueError, match="nothing reads: extra"):
    config_lib.check_config(config)


def test_default_rules_are_the_configs():
  from configs import common

  rules = sharding.rules_from_config(common.sharding_rules().to_dict())
  assert dict(rules) == dict(sharding.DEFAULT_RULES)
