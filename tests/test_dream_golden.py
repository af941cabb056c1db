"""Our Dream against Dream's own public PyTorch code, through fixtures it made
(scripts/dream_golden.py, tests/fixtures/dream; the copy of the code is named in the README): a
tiny random checkpoint saved by Dream's `save_pretrained`, its logits on a left-padded batch, and its
greedy `diffusion_generate` outputs with the step that committed each position."""

import functools
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from trafl_jax import hf_format, sampler
from trafl_jax import model as model_lib

from .conftest import subprocess_env

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "dream"


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(FIXTURES / "golden.npz"))


@pytest.fixture(scope="module")
def loaded():
  cfg = hf_format.model_config_from_hf(str(FIXTURES), dtype="float32")
  params, cfg = hf_format.load_hf_params(str(FIXTURES), cfg)
  return model_lib.Transformer(cfg), params


def test_the_checkpoint_reads_as_a_dream_model(loaded):
  model, _ = loaded
  assert model.cfg.family == "dream" and model.cfg.shift_logits and model.cfg.qkv_bias
  assert (model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.mask_token_id) == (4, 2, 63)
  assert model.cfg.rope_theta == 1e6 and not model.cfg.tie_embeddings


def test_logits_with_left_padding_equal_dreams_within_1e4(loaded, golden):
  """Dream's callers shift its logits right by one (`cat([l[:, :1], l[:, :-1]])`); ours are shifted
  inside the model. Compared where a position and the one before it are real tokens (the first real
  token's prediction comes from a padding row in Dream, which its code never reads)."""
  model, params = loaded
  tokens, valid = golden["logits_tokens"], golden["logits_valid"]
  ours = np.asarray(model.apply({"params": params}, tokens, valid))
  raw = golden["raw_logits"]
  theirs = np.concatenate([raw[:, :1], raw[:, :-1]], axis=1)
  compared = valid & np.concatenate([np.zeros_like(valid[:, :1]), valid[:, :-1]], axis=1)
  assert compared.sum() >= 50
  np.testing.assert_allclose(ours[compared], theirs[compared], atol=1e-4, rtol=0)


CASES = [
  k[len("gen_") :] for k in sorted(np.load(FIXTURES / "golden.npz").files) if k[:4] == "gen_"
]


@pytest.mark.parametrize("case", CASES)
def test_greedy_generations_equal_dreams_token_for_token(loaded, golden, case):
  """`diffusion_generate(alg, steps, top_p, top_k, temperature=0)` == schedule='dream' with the alg's
  remasking, one block over the canvas: the same tokens, committed at the same steps."""
  alg, steps, top_p, top_k = case.rsplit("_", 3)
  want, committed = golden[f"gen_{case}"], golden[f"commit_{case}"]
  model, params = loaded
  cfg = sampler.SamplerConfig(
    gen_length=want.shape[1],
    steps=int(steps),
    block_length=want.shape[1],
    schedule="dream",
    remasking=sampler.DREAM_ALGS[alg],
    top_p=float(top_p),
    top_k=int(top_k),
  )
  fn = jax.jit(functools.partial(sampler.generate, model=model, cfg=cfg))
  out = fn(params, golden["prompt"], golden["prompt_valid"], jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(out.completion_BxL), want)
  np.testing.assert_array_equal(np.asarray(out.commit_step_BxL), committed)


def test_dream_timesteps_are_torch_linspace_bit_for_bit(golden):
  for key in (k for k in golden if k.startswith("linspace_")):
    steps = int(key.split("_")[1])
    np.testing.assert_array_equal(sampler.dream_timesteps(steps, 1e-3), golden[key])


def test_the_sample_command_on_dreams_directory_gives_dreams_tokens(golden):
  """`python -m trafl_jax.sample` on the Hugging Face directory Dream's code saved, with Dream's
  settings as flags: each prompt's tokens before EOS are Dream's (our prompts padded wider)."""
  case = "entropy_16_1_0"
  ids = [row[valid] for row, valid in zip(golden["prompt"], golden["prompt_valid"])]
  env = subprocess_env()
  flags = ["--gen_length=16", "--steps=16", "--block_length=16", "--schedule=dream"]
  flags += ["--remasking=entropy", "--batch_size=3"]
  flags += [f"--prompt_ids={','.join(map(str, row))}" for row in ids]
  result = subprocess.run(
    [sys.executable, "-m", "trafl_jax.sample", f"--checkpoint={FIXTURES}", *flags],
    cwd=FIXTURES.parents[2],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  eos = 62  # config.json's eos_token_id
  for i, (prompt, want) in enumerate(zip(ids, golden[f"gen_{case}"])):
    end = list(want).index(eos) if eos in want else len(want)
    block = f"=== ids {i}: {' '.join(map(str, prompt))}\n{' '.join(map(str, want[:end]))}\n"
    assert block in result.stdout
