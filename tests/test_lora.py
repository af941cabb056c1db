"""Low-rank adapters: the model with and without them, post-training that trains only them (every
objective), their checkpoints, exact resume, and the base they belong to."""

import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import traverse_util
from safetensors import numpy as st_numpy

from configs import common
from configs import math as math_config
from trafl_jax import checkpoint as ckpt_lib
from trafl_jax import (
  config_lib,
  convert,
  hf_format,
  lora,
  metrics,
  objectives,
  pipeline,
  quant,
  sample,
  sharding,
)
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib

LORA = dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "ff_out"))


# The loop's mechanics need rewards that vary within a group (conftest.parity_rewards).
pytestmark = pytest.mark.usefixtures("parity_rewards")


def _config(seed=0, lora_settings=LORA, **rl):
  config = math_config.get_config("tiny")
  with config.unlocked():
    config.seed = seed
    config.train.progress = False
    for key, value in lora_settings.items():
      config.lora[key] = value
    for key, value in rl.items():
      config.rl[key] = value
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("lora") / "reference")
  pipeline.reference_stage(_config(), path)
  return path


def _tiny_params(cfg, rng=0):
  tokens = jnp.ones((2, 8), jnp.int32)
  model = model_lib.Transformer(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(rng), tokens, tokens > 0)["params"])
  return model, params


def _leaf_names(tree) -> set:
  return {path[-1] for path in traverse_util.flatten_dict(tree)}


@pytest.mark.parametrize("preset", ["tiny", "dream_tiny"])  # dream_tiny: biased q/k/v projections
def test_zero_adapters_are_the_base_and_merging_is_exact(preset):
  base_cfg = model_lib.ModelConfig(**model_lib.PRESETS[preset])
  cfg = lora.LoraConfig(**LORA).adapt(base_cfg)
  model, params = _tiny_params(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 5, base_cfg.vocab_size)
  valid = jnp.ones_like(tokens, bool).at[0, :3].set(False)
  assert _leaf_names(lora.adapters_of(params)) == {"lora_a", "lora_b"}
  base = lora.base_of(params)
  reference = model_lib.Transformer(base_cfg).apply({"params": base}, tokens, valid)
  # B starts at zero: the adapted policy is the reference exactly; the same model without the
  # adapters in its tree is the reference too (adapters off).
  np.testing.assert_array_equal(model.apply({"params": params}, tokens, valid), reference)
  np.testing.assert_array_equal(model.apply({"params": base}, tokens, valid), reference)
  moved = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.05 if p[-1].key == "lora_b" else x, params
  )
  adapted = model.apply({"params": moved}, tokens, valid)
  assert float(jnp.abs(adapted - reference).max()) > 1e-2
  merged = lora.merged(moved, cfg)
  assert _leaf_names(merged) == _leaf_names(base)
  np.testing.assert_allclose(
    model_lib.Transformer(base_cfg).apply({"params": merged}, tokens, valid), adapted, atol=2e-5
  )
  # Only the targeted projections changed when merged; the head (also named ff_out) is never adapted.
  flat_base, flat_merged = traverse_util.flatten_dict(base), traverse_util.flatten_dict(merged)
  changed = {p for p in flat_base if not np.array_equal(flat_base[p], flat_merged[p])}
  assert {p[-2] for p in changed} == set(LORA["targets"])
  assert ("ff_out", "kernel") not in changed and all(p[-1] == "kernel" for p in changed)


@pytest.mark.parametrize(
  "kind,q_dtype,tolerance", [("int8", jnp.int8, 0.1), ("nf4", jnp.uint8, 0.5)]
)
def test_a_quantized_base_is_within_its_tolerance_of_bfloat16(kind, q_dtype, tolerance):
  """The logits of a quantized base stay within a fraction of their standard deviation of the bfloat16
  base's (measured on tiny random weights: int8 per output channel 4.3%, nf4 per block of 64 inputs
  about 5x that), and the merged export dequantizes."""
  base_cfg = model_lib.ModelConfig(**model_lib.PRESETS["tiny"])
  _, full = _tiny_params(base_cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 5, base_cfg.vocab_size)
  valid = jnp.ones_like(tokens, bool)

  def logits(base_dtype):
    cfg = lora.LoraConfig(**LORA, base_dtype=base_dtype).adapt(base_cfg)
    return cfg, model_lib.Transformer(cfg).apply(
      {"params": lora.prepare_base(full, base_dtype)}, tokens, valid
    )

  cfg_q, quantized_logits = logits(kind)
  _, bf16 = logits("bfloat16")
  assert cfg_q.base_quant == kind
  error = float(jnp.abs(quantized_logits - bf16).max()) / float(bf16.std())
  assert 0 < error <= tolerance, error
  quantized = traverse_util.flatten_dict(lora.prepare_base(full, kind))
  kernels = [p for p in quantized if p[-1] == "kernel_q"]
  assert len(kernels) == 7 and all(quantized[p].dtype == q_dtype for p in kernels)
  assert ("ff_out", "kernel") in quantized and ("wte",) in quantized  # the head and embedding stay
  merged = lora.merged(lora.prepare_base(full, kind), cfg_q)
  np.testing.assert_allclose(
    model_lib.Transformer(base_cfg).apply({"params": merged}, tokens, valid),
    quantized_logits,
    atol=1e-4,
  )


@pytest.mark.parametrize("kind", ["bfloat16", "nf4"])
def test_the_base_is_prepared_on_the_host_and_placed_sharded(kind):
  """`place_base` (what post-training does with the reference it loaded into host memory) gives
  `prepare_base`'s arrays, each on its sharding of a (2, 4) mesh (fsdp x tensor)."""
  base_cfg = model_lib.ModelConfig(**model_lib.PRESETS["tiny"])
  cfg = lora.LoraConfig(**LORA, base_dtype=kind).adapt(base_cfg)
  _, full = _tiny_params(base_cfg)
  host = jax.device_put(full, jax.local_devices(backend="cpu")[0])
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  rules = sharding.rules_from_config(common.sharding_rules().to_dict())
  _, shardings = state_lib.param_target(model_lib.Transformer(cfg), mesh, rules)
  placed = traverse_util.flatten_dict(lora.place_base(host, kind, lora.base_of(shardings)))
  want = traverse_util.flatten_dict(lora.prepare_base(full, kind))
  target = traverse_util.flatten_dict(lora.base_of(shardings))
  assert set(placed) == set(want) == set(target)
  for path, x in placed.items():
    assert x.dtype == want[path].dtype and x.sharding == target[path], path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[path]))
  assert placed[
    ("blocks", "attn", "q_proj", "kernel" if kind == "bfloat16" else "kernel_q")
  ].sharding.spec[1:] == ("fsdp", "tensor")


def test_nf4_codes_are_the_nearest_code_book_value_of_each_block():
  """Each weight decodes to the NF4 value nearest its block-normalized value; a block's largest
  magnitude decodes exactly; two codes share a byte (input 2i low, 2i + 1 high)."""
  w_IxO = jax.random.normal(jax.random.PRNGKey(3), (128, 5))
  q, scale = quant.quantize("nf4", w_IxO)
  assert q.shape == (64, 5) and q.dtype == jnp.uint8 and scale.shape == (2, 5)
  w = np.asarray(w_IxO).reshape(2, 64, 5)
  np.testing.assert_allclose(scale, np.abs(w).max(1), rtol=1e-6)
  nearest = np.abs((w / np.abs(w).max(1, keepdims=True))[..., None] - quant.NF4).argmin(-1)
  codes = np.stack([np.asarray(q) & 0xF, np.asarray(q) >> 4], 1).reshape(128, 5)
  np.testing.assert_array_equal(codes, nearest.reshape(128, 5))
  w_back = np.asarray(quant.dequantize("nf4", q, scale, jnp.float32)).reshape(2, 64, 5)
  np.testing.assert_allclose(
    w_back, quant.NF4[nearest] * np.abs(w).max(1, keepdims=True), rtol=1e-6
  )
  biggest = np.abs(w).argmax(1)
  np.testing.assert_allclose(
    np.take_along_axis(np.abs(w_back), biggest[:, None], 1), np.abs(w).max(1, keepdims=True)
  )
  with pytest.raises(ValueError, match="nf4 kernel's input width 100"):
    quant.quantize("nf4", jnp.ones((100, 5)))


@pytest.mark.parametrize(
  "settings,match",
  [
    (dict(rank=-1), "must be >= 0"),
    (dict(rank=4, alpha=0.0), "alpha"),
    (dict(rank=4, alpha=8.0, targets=("q_proj", "wq")), "lora.targets"),
    (dict(rank=4, alpha=8.0, base_dtype="int4"), "base_dtype"),
  ],
)
def test_bad_lora_settings_are_named(settings, match):
  with pytest.raises(ValueError, match=match):
    config_lib.check_config(_config(lora_settings=settings))


def test_unknown_lora_key_is_named():
  config = _config()
  with config.unlocked():
    config.lora.dropout = 0.05
  with pytest.raises(ValueError, match="config.lora has keys nothing reads: dropout"):
    config_lib.check_config(config)


def _item_tree(workdir: str, step: int, item: str):
  path = os.path.join(workdir, "checkpoints", str(step), item)
  return ocp.StandardCheckpointer().metadata(path).item_metadata.tree


@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_only_the_adapters_train(reference, tmp_path, objective):
  workdir = str(tmp_path / objective)
  lr = {"lr": 3e-2} if objective == "wd1" else {}  # wd1 steps only on rewarded rows
  config = _config(objective=objective, num_steps=2, eval_every=0, **lr)
  if (
    objective == "elbo_grpo"
  ):  # one objective on an int8 base: it trains, resumes and loads the same
    config.lora.base_dtype = "int8"
  last = pipeline.posttrain_stage(config, workdir, reference)
  assert np.isfinite(last["rl/loss"])
  # The checkpoint holds the adapters (and the optimizer state of nothing else), never the base.
  assert _leaf_names(_item_tree(workdir, 2, "params")) == {"lora_a", "lora_b"}
  opt_state = _item_tree(workdir, 2, "train_state")["opt_state"]
  paths = [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(
      opt_state, is_leaf=lambda x: hasattr(x, "shape")
    )
  ]
  moments = [p for p in paths if "['blocks']" in p or "['wte']" in p or "['ln_f']" in p]
  assert moments and all("['lora_a']" in p or "['lora_b']" in p for p in moments)
  # The run loads as base + adapters; its base is the reference's parameters (in lora.base_dtype).
  policy = sample.Generator.load(workdir)
  ref = sample.Generator.load(reference)
  assert policy.cfg.lora_rank == LORA["rank"]
  flat_base = traverse_util.flatten_dict(lora.base_of(policy.params))
  expected = traverse_util.flatten_dict(lora.prepare_base(ref.params, config.lora.base_dtype))
  assert expected.keys() == flat_base.keys()
  for path, x in expected.items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_base[path]))
  adapters = traverse_util.flatten_dict(lora.adapters_of(policy.params))
  b_moved = any(float(jnp.abs(x).max()) > 0 for p, x in adapters.items() if p[-1] == "lora_b")
  assert b_moved or (objective == "wd1" and last["rl/grad_norm"] == 0)


def test_resume_is_exact_and_refuses_another_base(reference, tmp_path):
  config = _config(num_steps=4, ckpt_every=1, eval_every=0, sample_every=0)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  pipeline.posttrain_stage(config, straight, reference)
  pipeline.posttrain_stage(config, resumed, reference, max_steps=2)
  pipeline.posttrain_stage(config, resumed, reference)
  a, b = metrics.read_metrics(straight), metrics.read_metrics(resumed)
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for key in ("rl/loss", "rl/reward_mean", "rl/kl_estimate", "trafl/log_z_mean"):
    assert [r[key] for r in a] == [r[key] for r in b], key
  pa = ocp.StandardCheckpointer().restore(os.path.join(straight, "checkpoints", "4", "params"))
  pb = ocp.StandardCheckpointer().restore(os.path.join(resumed, "checkpoints", "4", "params"))
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  # Another base (a reference trained with another seed): the adapters do not belong to it.
  other = str(tmp_path / "other_reference")
  pipeline.reference_stage(_config(seed=1), other)
  with pytest.raises(ckpt_lib.CheckpointError, match="adapters trained on base .*reference.*other"):
    pipeline.posttrain_stage(_config(num_steps=6), resumed, other)


def test_rank_zero_records_no_adapters(reference, tmp_path):
  workdir = str(tmp_path / "full")
  pipeline.posttrain_stage(_config(lora_settings={"rank": 0}, num_steps=1), workdir, reference)
  saved = ckpt_lib.Checkpointer(workdir, 1).saved_config(1)
  assert not any(k.startswith("lora_") for k in saved["model"]) and "lora_base" not in saved
  assert "wte" in _item_tree(workdir, 1, "params")


@pytest.fixture(scope="module")
def lora_run(reference, tmp_path_factory):
  """A trafl run with float32 base (so a NumPy merge can be compared tightly), adapters moved."""
  workdir = str(tmp_path_factory.mktemp("lora_run") / "run")
  settings = {**LORA, "base_dtype": "float32"}
  config = _config(lora_settings=settings, num_steps=2, eval_every=0, lr=3e-2)
  pipeline.posttrain_stage(config, workdir, reference)
  return workdir


def test_exports_are_the_same_model(reference, lora_run, tmp_path):
  merged_dir, peft_dir, base_dir = (str(tmp_path / d) for d in ("merged", "peft", "base"))
  convert.orbax_to_hf(lora_run, merged_dir, merge_lora=True)
  convert.orbax_to_peft(lora_run, peft_dir)
  convert.orbax_to_hf(reference, base_dir)
  merged, base = hf_format.read_safetensors(merged_dir), hf_format.read_safetensors(base_dir)
  peft = st_numpy.load_file(os.path.join(peft_dir, hf_format.PEFT_WEIGHTS))
  with open(os.path.join(peft_dir, hf_format.PEFT_CONFIG)) as f:
    peft_config = json.load(f)
  assert peft_config["r"] == LORA["rank"] and peft_config["lora_alpha"] == LORA["alpha"]
  assert peft_config["base_model_name_or_path"] == reference
  adapted = {k.removeprefix(hf_format.PEFT_PREFIX).removesuffix(".lora_A.weight") for k in peft}
  adapted = {k for k in adapted if not k.endswith(".weight")}
  assert adapted and all(re.fullmatch(peft_config["target_modules"], m) for m in adapted)
  assert not re.fullmatch(peft_config["target_modules"], hf_format.PREFIX + "ff_out")  # the head
  assert base.keys() == merged.keys()
  scale = LORA["alpha"] / LORA["rank"]
  for name, w in base.items():
    module = name.removesuffix(".weight")
    expected = w
    if module in adapted:  # PEFT's merge, by hand: W + (alpha / r) B A
      a = peft[f"{hf_format.PEFT_PREFIX}{module}.lora_A.weight"]
      b = peft[f"{hf_format.PEFT_PREFIX}{module}.lora_B.weight"]
      assert a.shape == (LORA["rank"], w.shape[1]) and b.shape == (w.shape[0], LORA["rank"])
      expected = w + scale * (b @ a)
      assert float(np.abs(scale * (b @ a)).max()) > 0
    np.testing.assert_allclose(merged[name], expected, atol=1e-6, err_msg=name)
  # The merged directory computes what the run's base + adapters compute.
  tokens = np.random.default_rng(0).integers(5, 100, (2, 10)).astype(np.int32)
  valid = np.ones_like(tokens, bool)
  run, hf = sample.Generator.load(lora_run), sample.Generator.load(merged_dir)
  np.testing.assert_allclose(
    hf.model.apply({"params": hf.params}, tokens, valid),
    run.model.apply({"params": run.params}, tokens, valid),
    atol=1e-5,
  )
  with pytest.raises(ValueError, match="--merge_lora"):
    convert.orbax_to_hf(lora_run, str(tmp_path / "unmerged"))
  with pytest.raises(ValueError, match="not a lora run"):
    convert.orbax_to_peft(reference, str(tmp_path / "no_adapters"))


def test_a_missing_base_is_named(lora_run, tmp_path):
  moved = str(tmp_path / "run")
  shutil.copytree(lora_run, moved)
  for meta in glob.glob(os.path.join(moved, "checkpoints", "*", "config", "metadata")):
    with open(meta) as f:
      saved = json.load(f)
    saved["lora_base"]["path"] = str(tmp_path / "gone")
    with open(meta, "w") as f:
      json.dump(saved, f)
  with pytest.raises(ValueError, match="holds adapters for the base .*gone, which does not exist"):
    sample.Generator.load(moved)
