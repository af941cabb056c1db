"""scripts/memory_plan.py's machinery on the tiny preset and the 8 fake devices: the steps posttrain.py
runs compile from abstract inputs, and the numbers behave (sharding divides the state, micro-batches cut
the activations, the peak adds up)."""

import importlib.util
import sys

import jax
import pytest

from configs import math as math_config

from .conftest import ROOT

_spec = importlib.util.spec_from_file_location("memory_plan", ROOT / "scripts" / "memory_plan.py")
memory_plan = importlib.util.module_from_spec(_spec)
sys.modules["memory_plan"] = memory_plan  # dataclasses look their module up there
_spec.loader.exec_module(memory_plan)


def _config(micro_batches=1, **mesh):
  config = math_config.get_config("tiny")
  config.rl.prompts_per_step, config.rl.group_size = 8, 4  # 32 rows: 4 a device, 1 when M = 4
  config.rl.gen_length, config.rl.sample_steps, config.rl.block_length = 32, 8, 32
  config.rl.micro_batches = micro_batches
  config.mesh.data, config.mesh.fsdp = 1, -1
  for key, value in mesh.items():
    config.mesh[key] = value
  return config


@pytest.fixture(scope="module")
def plans():
  devices = jax.devices()[:8]
  return {m: memory_plan.plan(_config(m), devices, 32, log=lambda _: None) for m in (1, 4)}


def test_every_step_compiles_and_the_peak_adds_up(plans):
  result = plans[1]
  assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert result["seq_len"] == 64 and result["rows"] == 32
  resident = result["resident"]
  for part in ("state", "reference", "batch", "prepared"):
    assert resident[part] > 0, part
  assert resident["total"] == sum(resident[p] for p in ("state", "reference", "batch", "prepared"))
  assert set(result["steps"]) == {"sampler", "prepare", "update"}
  for name, step in result["steps"].items():
    assert step.argument > 0 and step.temp > 0, name
  update = result["steps"]["update"]
  # The state is donated: the new one is written over it, not next to it.
  assert update.alias >= resident["state"] * 0.99 and update.output - update.alias < 2**20
  # The sampler's prompts are its only arguments that are not resident.
  # The sampler's prompts (4 rows a device, int32 tokens and bool validity) and its key are its only
  # arguments that are not resident.
  assert result["steps"]["sampler"].non_resident_arguments == 4 * 32 * (4 + 1) + 8
  assert result["peak"] == resident["total"] + max(
    s.peak_over_resident for s in result["steps"].values()
  )
  # The state and reference are the analytic f32 policy + two AdamW moments + float32 reference
  # spread over the devices, plus the replicated log Z head (and the step and key).
  analytic = result["analytic"]
  expected = analytic["state_and_reference"] + analytic["log_z_head"]
  assert resident["state"] + resident["reference"] == pytest.approx(expected, rel=1e-3)


def test_micro_batches_cut_the_temporaries_not_the_resident_buffers(plans):
  one, four = plans[1], plans[4]
  assert four["resident"] == one["resident"]
  for step in ("prepare", "update"):
    assert four["steps"][step].temp < one["steps"][step].temp, step
  assert four["steps"]["sampler"].temp == one["steps"]["sampler"].temp
  assert four["peak"] < one["peak"]


def test_more_devices_hold_less_of_the_state():
  config = _config()
  four = memory_plan.plan(config, jax.devices()[:4], 32, steps=())
  eight = memory_plan.plan(config, jax.devices()[:8], 32, steps=())
  sharded = lambda r: r["resident"]["state"] - r["analytic"]["log_z_head"]
  assert sharded(eight) == pytest.approx(sharded(four) / 2, rel=0.05)
  assert eight["resident"]["reference"] == pytest.approx(
    four["resident"]["reference"] / 2, rel=0.05
  )


def test_table_and_targets():
  target = memory_plan.Target(devices=8, hbm_gib=1.0)
  result = {
    "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
    "resident": {"total": 0.5 * 2**30},
    "analytic": {"state_and_reference": 0.4 * 2**30},
    "steps": {},
    "peak": 0.95 * 2**30,
  }
  row = memory_plan.table_row("t", target, "settings", result)
  assert row.count("|") == memory_plan.table_header().splitlines()[0].count("|")
  assert row.endswith("| 0.95 | **no** |")  # 95% of HBM is above the 90% line
  result["peak"] = 0.85 * 2**30
  assert memory_plan.table_row("t", target, "settings", result).endswith("| yes |")
  unfit = memory_plan.unfit_row("t", target, "settings", "Ran out of memory on HBM")
  assert unfit.count("|") == row.count("|") and unfit.endswith("| **no** |")
  assert memory_plan.target_names("all") == sorted(memory_plan.TARGETS)
  assert memory_plan._device_count_from_argv(["x", "--target=h100x8,v4-32"]) == 16
  assert memory_plan._device_count_from_argv(["x"]) == 64
  with pytest.raises(ValueError, match="unknown target"):
    memory_plan.target_names("v7-8")
  # Every recommended setting names an existing config key.
  config = math_config.get_config("gsm8k")
  for t in memory_plan.TARGETS.values():
    memory_plan.apply_overrides(config, t.overrides)


def test_adapters_plan_one_base_and_train_only_themselves(plans):
  config = _config()
  config.lora.rank, config.lora.alpha, config.lora.base_dtype = 4, 8.0, "bfloat16"
  result = memory_plan.plan(config, jax.devices()[:8], 32, log=lambda _: None)
  full = plans[1]
  assert result["resident"]["reference"] == 0  # the reference is the base with adapters off
  assert result["resident"]["state"] < full["resident"]["state"] + full["resident"]["reference"]
  assert 0 < result["analytic"]["trained_params"] < result["analytic"]["params"] / 4
  assert set(result["steps"]) == {"sampler", "prepare", "update"}
  assert "lora r4 on a bfloat16 base" in memory_plan.settings_of(config)


def test_rows_that_do_not_divide_over_the_devices_are_named():
  config = _config()
  config.rl.prompts_per_step = 3  # 12 rows over 8 devices
  with pytest.raises(ValueError, match="= 12 rows do not divide over the mesh's data x fsdp = 8"):
    memory_plan.plan(config, jax.devices()[:8], 32, steps=())


def test_the_evaluation_stage_is_planned_as_a_stage_of_its_own():
  config = _config()
  config.eval.batch_size = (
    12  # rounded up to 16 rows over the 8 devices, as Generator.generate does
  )
  result = memory_plan.plan(config, jax.devices()[:8], 32, steps=("evaluate",), log=lambda _: None)
  evaluate = result["evaluate"]
  # Its arguments: float32 parameters on the run's mesh (the float32 reference's bytes), 2 prompt rows
  # a device (int32 tokens, bool validity) and the key; none of post-training's buffers.
  assert result["resident"]["reference"] > 0
  assert evaluate.non_resident_arguments == result["resident"]["reference"] + 2 * 32 * (4 + 1) + 8
  assert evaluate.temp > 0
  assert memory_plan.overall_peak(result) == max(result["peak"], evaluate.peak_over_resident)
