"""Golden Dream outputs for tests/test_dream_golden.py, made by Dream's own public code (PyTorch).

Dream's modeling and generation code ships only with its Hugging Face model repositories
(`modeling_dream.py`, `configuration_dream.py`, `generation_utils.py` in Dream-org/Dream-v0-Base-7B,
Dream-v0-Instruct-7B, apple/DiffuCoder-7B-*); this project does not copy it. Point `--dream_code` at
a directory holding those three files (a download of one of those repositories, without the weights,
or a copy from a repository that vendors them), in an environment with torch and transformers:

  pip install torch transformers==4.51.3 safetensors
  python scripts/dream_golden.py --dream_code=/path/to/Dream-v0-Instruct-7B --out=tests/fixtures/dream
  # optional: the same outputs from a second copy of the code (fails if any differ)
  python scripts/dream_golden.py --dream_code=/path/a --check_code=/path/b --out=/tmp/dream_check

It builds a tiny random Dream model through `AutoModel` with `trust_remote_code` (the way users load
Dream), saves it with `save_pretrained` (config.json + model.safetensors), and records in golden.npz:
the raw logits of a left-padded batch with MASK tokens under Dream's generation-time attention mask
and position ids; greedy `diffusion_generate` outputs for each confidence algorithm and step count,
with the step that committed each position (from `output_history`); and `torch.linspace(1, eps,
steps + 1)` for several step counts. The tests read only those files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

TINY = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
  rope_theta=1000000.0,
  rms_norm_eps=1e-6,
  tie_word_embeddings=False,
  mask_token_id=63,
  pad_token_id=62,
  bos_token_id=62,
  eos_token_id=62,
  initializer_range=0.3,  # peaked distributions: greedy choices are not near-ties
  torch_dtype="float32",
  model_type="Dream",
  architectures=["DreamModel"],
  auto_map={
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel",
  },
)
CODE = ("modeling_dream.py", "configuration_dream.py", "generation_utils.py")
# (algorithm, steps, top_p, top_k): greedy runs, deterministic in Dream's code. top_k is always
# passed: left out, `diffusion_generate` inherits the model config's legacy `top_k` (50 under
# transformers 4.51), which renormalizes the probabilities the confidences are computed from.
CASES = [
  ("maskgit_plus", 16, None, None),
  ("maskgit_plus", 8, None, None),
  ("maskgit_plus", 16, None, 50),
  ("topk_margin", 16, None, None),
  ("topk_margin", 5, None, None),
  ("entropy", 16, None, None),
  ("entropy", 8, None, None),
  ("entropy", 8, 0.9, None),
  ("entropy", 8, None, 50),
]
GEN_LENGTH = 16
LINSPACE_STEPS = (1, 4, 5, 7, 8, 16, 33, 128, 256, 512)


def _load(code_dir: str, workdir: str, seed: int):
  import torch
  from transformers import AutoConfig, AutoModel

  for name in CODE:
    shutil.copy(os.path.join(code_dir, name), workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(TINY, f)
  config = AutoConfig.from_pretrained(workdir, trust_remote_code=True)
  torch.manual_seed(seed)
  model = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=torch.float32)
  with torch.no_grad():  # the MASK id's logit is 0, below the peaked maximum: never predicted
    model.lm_head.weight[TINY["mask_token_id"]] = 0.0
  return model.eval()


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, 60, (3, 7))
  valid = np.ones_like(prompt, bool)
  valid[0, :3] = False  # left padding, as Dream's demos and evaluation pad
  valid[1, :1] = False
  prompt = np.where(valid, prompt, TINY["pad_token_id"])
  return prompt, valid


def golden(code_dir: str, seed: int) -> tuple[dict, str]:
  import torch

  workdir = tempfile.mkdtemp()
  model = _load(code_dir, workdir, seed)
  out = {}
  prompt, valid = _inputs(seed)
  mask = TINY["mask_token_id"]
  # Logits: the prompt, then a canvas of MASKs with some tokens already committed.
  canvas = np.full((3, GEN_LENGTH), mask)
  canvas[:, ::3] = np.random.default_rng(seed + 1).integers(0, 60, (3, (GEN_LENGTH + 2) // 3))
  tokens = np.concatenate([prompt, canvas], 1)
  full_valid = np.concatenate([valid, np.ones_like(canvas, bool)], 1)
  m = torch.tensor(full_valid)
  position_ids = m.long().cumsum(-1) - 1
  position_ids.masked_fill_(~m, 1)
  attention = torch.logical_and(m[:, None, None, :], m[:, None, :, None])
  with torch.no_grad():
    logits = model(torch.tensor(tokens), attention, position_ids).logits
  out |= dict(logits_tokens=tokens, logits_valid=full_valid, raw_logits=logits.numpy())
  out |= dict(prompt=prompt, prompt_valid=valid)
  for alg, steps, top_p, top_k in CASES:
    with torch.no_grad():
      result = model.diffusion_generate(
        torch.tensor(prompt),
        attention_mask=torch.tensor(valid.astype(np.int64)),
        max_new_tokens=GEN_LENGTH,
        steps=steps,
        temperature=0.0,
        top_p=top_p,
        top_k=top_k,
        alg=alg,
        alg_temp=0.0,
        output_history=True,
        return_dict_in_generate=True,
      )
    history = np.stack([h.numpy() for h in result.history])[:, :, prompt.shape[1] :]
    masked = np.concatenate([np.full((1, *history.shape[1:]), True), history == mask])
    committed = np.where(
      (masked[:-1] & ~masked[1:]).any(0), (masked[:-1] & ~masked[1:]).argmax(0), -1
    )
    key = f"{alg}_{steps}_{top_p or 1.0:g}_{top_k or 0}"
    out[f"gen_{key}"] = result.sequences.numpy()[:, prompt.shape[1] :]
    out[f"commit_{key}"] = committed
  for steps in LINSPACE_STEPS:
    out[f"linspace_{steps}"] = torch.linspace(1, 1e-3, steps + 1).numpy()
  model.save_pretrained(os.path.join(workdir, "saved"), safe_serialization=True)
  return out, os.path.join(workdir, "saved")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--dream_code", required=True, help="directory with Dream's remote code files"
  )
  parser.add_argument(
    "--check_code", help="a second copy of the code: its outputs must be the same"
  )
  parser.add_argument("--out", required=True, help="fixture directory to write")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  for d in filter(None, (args.dream_code, args.check_code)):
    missing = [n for n in CODE if not os.path.exists(os.path.join(d, n))]
    if missing:
      sys.exit(f"error: {d} lacks Dream's {', '.join(missing)}")
  out, saved = golden(args.dream_code, args.seed)
  if args.check_code:
    other, _ = golden(args.check_code, args.seed)
    for key in out:  # tokens and steps exactly; logits within the tests' 1e-4
      a, b = out[key], other[key]
      same = np.allclose(a, b, atol=1e-4, rtol=0) if a.dtype.kind == "f" else np.array_equal(a, b)
      if not same:
        sys.exit(f"error: {key} differs between {args.dream_code} and {args.check_code}")
    worst = np.abs(out["raw_logits"] - other["raw_logits"]).max()
    print(f"the two copies agree on {len(out)} outputs (logits within {worst:.1e})")
  os.makedirs(args.out, exist_ok=True)
  np.savez_compressed(os.path.join(args.out, "golden.npz"), **out)
  with open(os.path.join(saved, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(args.out, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  shutil.copy(os.path.join(saved, "model.safetensors"), args.out)
  print(f"wrote {args.out}: golden.npz ({len(out)} arrays), config.json, model.safetensors")


if __name__ == "__main__":
  main()
