"""Generating from checkpoints: the Python API, chat templates, and the command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import linen as nn

from configs import math as math_config
from trafl_jax import convert, pipeline, sample, sampler
from trafl_jax import model as model_lib

from .conftest import ROOT, small_model_config, subprocess_env

PROMPTS = [
  "Numbers: 3 7 12. Target: 33.\n",
  "Numbers: 5 2 9. Target: 19.\n",
  "Numbers: 1 2. Target: 3.\n",
]
SETTINGS = dict(gen_length=16, steps=8, block_length=8)

# LLaDA-8B-Instruct's chat template (Llama-3 style) and special tokens.
LLADA_TEMPLATE = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
  "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
  "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
  "{{ content }}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = [
  "<pad>",
  "<unk>",
  "<|startoftext|>",
  "<|endoftext|>",
  "<|mdm_mask|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eot_id|>",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sample") / "run")
  config = math_config.get_config("tiny")
  with config.unlocked():
    config.train.progress = False
  pipeline.reference_stage(config, path)
  return path


def test_generator_matches_the_sampler_row_by_row(workdir):
  generator = sample.Generator.load(workdir)
  out = generator.generate(
    PROMPTS, batch_size=2, **SETTINGS
  )  # two calls, the second with a filler row
  assert [c.prompt for c in out] == PROMPTS
  for c in out:
    # One prompt alone (different padding, different batch) gives the same completion.
    alone = generator.generate([c.prompt], batch_size=1, **SETTINGS)[0]
    np.testing.assert_array_equal(alone.tokens, c.tokens)
    assert alone.text == c.text
    assert c.tokens.shape == (16,) and (c.commit_steps >= 0).all() and (c.commit_steps < 8).all()
    eos = np.nonzero(c.tokens == generator.cfg.eos_token_id)[0]
    upto = eos[0] if len(eos) else 16
    assert c.text == generator.tokenizer.decode(c.tokens[:upto].tolist())
  # A step directory of the same run loads the same model and tokenizer.
  step_dir = os.path.join(workdir, "checkpoints", "20")
  again = sample.Generator.load(step_dir).generate(PROMPTS, batch_size=2, **SETTINGS)
  assert [c.text for c in again] == [c.text for c in out]
  sampled = generator.generate(PROMPTS[:1] * 4, temperature=1.0, seed=3, **SETTINGS)
  assert len({c.tokens.tobytes() for c in sampled}) > 1  # rows draw different noise


def _hf_checkpoint(path):
  words = ["user", "assistant", "hello", "world", "what", "is", "two", "plus", "three", "five"]
  vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in SPECIALS])
  os.makedirs(path)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": LLADA_TEMPLATE, "bos_token": "<|startoftext|>"}, f)
  cfg = small_model_config(pad_token_id=3)
  params = model_lib.Transformer(cfg).init(
    jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool)
  )["params"]
  staging = path + "_model"
  convert.write_hf(nn.unbox(params), cfg, staging)
  for name in os.listdir(staging):
    os.replace(os.path.join(staging, name), os.path.join(path, name))
  return cfg


def test_hugging_face_directory_with_chat_template(tmp_path):
  hf_dir = str(tmp_path / "llada")
  cfg = _hf_checkpoint(hf_dir)
  generator = sample.Generator.load(hf_dir)
  assert generator.cfg.d_model == cfg.d_model
  formatted = generator.format_prompt("what is two plus three")
  assert formatted == (
    "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nwhat is two plus three<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
  )
  ids = generator.tokenizer.encode(formatted)
  assert ids[:2] == [2, 5] and 7 in ids  # special tokens map to their ids
  assert generator.format_prompt("hello", chat=False) == "hello"
  [c] = generator.generate(["what is two plus three"], **SETTINGS)
  stops = np.isin(c.tokens, generator.end_ids)
  upto = int(stops.argmax()) if stops.any() else 16
  assert c.text == generator.tokenizer.decode(c.tokens[:upto].tolist())
  assert 7 in generator.end_ids and 3 in generator.end_ids  # <|eot_id|> and EOS end an answer


def test_read_prompts(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("first\\nline\n\nsecond\n")
  assert sample.read_prompts(str(txt)) == ["first\nline", "second"]
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text('{"question": "q1"}\n{"prompt": "p2"}\n')
  assert sample.read_prompts(str(jsonl)) == ["q1", "p2"]
  jsonl.write_text('{"question": "q1"}\n{"answer": "no prompt"}\n')
  with pytest.raises(ValueError, match="line 2"):
    sample.read_prompts(str(jsonl))


def _cli(*args):
  env = subprocess_env()
  return subprocess.run(
    [sys.executable, "-m", "trafl_jax.sample", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=180,
  )


def test_command_line(workdir, tmp_path):
  generator = sample.Generator.load(workdir)
  want = generator.generate(PROMPTS[:2], **SETTINGS)
  result = _cli(
    f"--checkpoint={workdir}",
    f"--prompt={PROMPTS[0]}",
    f"--prompt={PROMPTS[1]}",
    "--gen_length=16",
    "--steps=8",
    "--block_length=8",
  )
  assert result.returncode == 0, result.stderr
  assert f"=== 0: {PROMPTS[0].strip()}\n{want[0].text}\n" in result.stdout
  assert f"=== 1: {PROMPTS[1].strip()}\n{want[1].text}\n" in result.stdout
  modes = dict(cache="dual", threshold=0.9, stop_at_eos=True)
  fast = generator.generate(PROMPTS[:1], **SETTINGS, **modes)
  result = _cli(
    f"--checkpoint={workdir}",
    f"--prompt={PROMPTS[0]}",
    "--gen_length=16",
    "--steps=8",
    "--block_length=8",
    "--cache=dual",
    "--threshold=0.9",
    "--stop_at_eos",
  )
  assert result.returncode == 0, result.stderr
  assert f"=== 0: {PROMPTS[0].strip()}\n{fast[0].text}\n" in result.stdout
  with pytest.raises(ValueError, match="unknown sampler settings \\['kv_cache'\\]"):
    generator.generate(PROMPTS[:1], **SETTINGS, kv_cache="dual")
  bad = _cli(f"--checkpoint={tmp_path / 'nowhere'}", "--prompt=hi")
  assert bad.returncode == 1 and "error:" in bad.stderr and "nowhere" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_readme_python_example_runs(workdir, capsys):
  readme = (ROOT / "README.md").read_text()
  block = readme.split("```python\n", 1)[1].split("```", 1)[0]
  exec(compile(block.replace('"runs/math/trafl"', repr(workdir)), "README.md", "exec"), {})
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 2 and printed[0].startswith("Numbers: 3 7 12. Target: 33. ->")
  assert "commit steps: [" in printed[1]


def test_a_checkpoint_without_tokenizer_samples_token_ids(tmp_path, workdir):
  bare = str(tmp_path / "bare")
  cfg = small_model_config(pad_token_id=3)
  params = model_lib.Transformer(cfg).init(
    jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool)
  )["params"]
  convert.write_hf(nn.unbox(params), cfg, bare)  # weights and config.json, no tokenizer
  generator = sample.Generator.load(bare)
  assert generator.tokenizer is None
  ids = [[5, 6, 7], [8, 9, 10, 11], [12]]
  tokens, steps, _ = generator.generate_ids(ids, batch_size=2, **SETTINGS)
  assert tokens.shape == steps.shape == (3, 16)
  assert (steps >= 0).all() and (steps < 8).all()  # every position committed at some step
  # The same rows as one call of the sampler on the padded prompts (the second chunk's seed differs).
  scfg = sampler.SamplerConfig(**SETTINGS)
  prompt, valid = generator.pad_prompts(ids[:2], 8)
  direct = generator._fn(scfg)(generator.params, prompt, valid, jax.random.PRNGKey(0))[0]
  np.testing.assert_array_equal(tokens[:2], np.asarray(direct)[:2])
  with pytest.raises(ValueError, match="has no tokenizer"):
    generator.generate(["hi"], **SETTINGS)
  flags = ("--gen_length=16", "--steps=8", "--block_length=8")
  result = _cli(f"--checkpoint={bare}", "--prompt_ids=5,6,7", *flags)
  assert result.returncode == 0, result.stderr
  want = " ".join(
    map(str, generator.until_end(generator.generate_ids([[5, 6, 7]], **SETTINGS)[0][0]))
  )
  assert f"=== ids 0: 5 6 7\n{want}\n" in result.stdout
  text = _cli(f"--checkpoint={bare}", "--prompt=hi")
  assert (
    text.returncode == 1 and "has no tokenizer" in text.stderr and "--prompt_ids" in text.stderr
  )
