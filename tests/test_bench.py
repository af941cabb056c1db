"""The benchmark's RL step runs through the training loop's jitted functions and reports sane rates."""

import json

import pytest

from configs import common
from configs import math as math_config
from trafl_jax import bench, config_lib, objectives, pipeline, sampler
from trafl_jax import model as model_lib


def test_rl_bench_times_every_part_on_tiny():
  scfg = sampler.SamplerConfig(gen_length=8, steps=4, block_length=8, temperature=1.0)
  result = bench.bench_rl("tiny", "trafl", 2, 4, 8, scfg, inner=2, repeats=1)
  for key in ("sample_s", "score_s", "update_s", "sample_flops_per_s", "update_flops_per_s"):
    assert result[key] > 0, key
  assert result["batch"] == 8 and result["devices"] == 8
  assert result["outer_step_s"] == pytest.approx(
    result["sample_s"] + result["score_s"] + result["update_s"]
  )


def test_rl_bench_with_adapters_trains_less_and_holds_one_base():
  scfg = sampler.SamplerConfig(gen_length=8, steps=4, block_length=8, temperature=1.0)
  full = bench.bench_rl("tiny", "trafl", 2, 4, 8, scfg, inner=1, repeats=1)
  adapted = bench.bench_rl("tiny", "trafl", 2, 4, 8, scfg, inner=1, repeats=1, lora_rank=4)
  assert adapted["lora_rank"] == 4 and full["lora_rank"] == 0
  assert 0 < adapted["trained_params"] < full["trained_params"] / 4
  assert adapted["state_bytes"] < full["state_bytes"] / 2  # no reference copy, no base moments
  for result in (full, adapted):
    assert result["update_s"] > 0 and result["update_peak_bytes"] > 0
  assert adapted["sample_merged_s"] > 0 and "sample_merged_s" not in full  # merged vs unmerged


def test_rl_step_flops_count_the_masked_copies():
  values = {k: v for k, v in common.model_config("tiny").items() if k != "preset"}
  cfg = model_lib.ModelConfig(**values)
  fwd = model_lib.forward_flops(cfg, 8, 32)
  one_step = objectives.ObjectiveConfig(objective="diffu_grpo")
  assert bench.rl_step_flops(cfg, one_step, 2, 4, 32, 1) == pytest.approx(5 * fwd)
  pair = objectives.ObjectiveConfig(objective="elbo_grpo", num_masks=2)
  assert bench.rl_step_flops(cfg, pair, 2, 4, 32, 3) == pytest.approx(3 * 10 * fwd)
  trafl = objectives.ObjectiveConfig(objective="trafl", num_masks=2, log_z="mlp")
  log_z = model_lib.forward_flops(cfg, 2, 32)
  assert bench.rl_step_flops(cfg, trafl, 2, 4, 32, 1) == pytest.approx(10 * fwd + log_z)


def test_sample_bench_times_a_fast_mode_beside_the_exact_sampler():
  scfg = sampler.SamplerConfig(
    gen_length=16, steps=8, block_length=8, cache="dual", threshold=0.9, stop_at_eos=True
  )
  out = bench.bench_sample("tiny", batch=8, prompt_len=8, scfg=scfg, dtype="float32", repeats=1)
  assert out["mode"] == "dual+t0.9+eos"
  assert out["speedup_vs_exact"] == pytest.approx(out["exact_call_s"] / out["call_s"])
  assert out["tokens_per_s"] == pytest.approx(8 * 16 / out["call_s"])
  assert 0.0 <= out["agreement"] <= 1.0
  # One evaluation per step at most: the threshold or finished rows only make it fewer than 16.
  assert 0 < out["nfe_per_token"] <= 1.0
  exact = bench.bench_sample(
    "tiny", 8, 8, sampler.SamplerConfig(gen_length=16, steps=8, block_length=8), "float32", 1
  )
  assert "speedup_vs_exact" not in exact and exact["nfe_per_token"] == 0.5


def test_sample_bench_on_a_trained_checkpoint_with_question_prompts(tmp_path):
  config = math_config.get_config("tiny")
  config.train.progress = False
  reference = str(tmp_path / "reference")
  pipeline.reference_stage(config, reference)
  prompts = tmp_path / "questions.jsonl"
  rows = [{"question": f"{i}+{i}=", "answer": f"#### {2 * i}"} for i in range(10)]
  prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
  scfg = sampler.SamplerConfig(
    gen_length=8, steps=8, block_length=8, cache="dual", stop_at_eos=True
  )
  out = bench.bench_sample("tiny", 8, 16, scfg, "float32", 1, reference, str(prompts))
  assert (
    out["checkpoint"] == reference and out["params"] == config_lib.model_config(config).num_params()
  )
  assert 0.0 <= out["answer_agreement"] <= 1.0 and out["speedup_vs_exact"] > 0
  assert 0.0 <= out["greedy_accuracy"] <= 1.0 and 0.0 <= out["exact_greedy_accuracy"] <= 1.0
  prompts.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in rows))
  out = bench.bench_sample("tiny", 8, 16, scfg, "float32", 1, reference, str(prompts))
  assert "answer_agreement" in out and "greedy_accuracy" not in out  # no gold answers to score
