"""Generating text from a checkpoint: a small Python API and `python -m trafl_jax.sample`.

  from trafl_jax import sample
  generator = sample.Generator.load("runs/math")          # workdir, step dir, converted or HF dir
  for c in generator.generate(["Numbers: 3 7 12. Target: 33.\\n"], gen_length=16, steps=16):
    print(c.text)

  python -m trafl_jax.sample --checkpoint=runs/math --prompt="Numbers: 3 7 12. Target: 33." \\
    --gen_length=16 --steps=16 --block_length=16

A Hugging Face `tokenizer.json` in the checkpoint directory is used as is, and its `chat_template` (from
`tokenizer_config.json`) wraps each prompt as one user turn, as LLaDA-Instruct expects. Runs of ours use the
sentencepiece model cached in their workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence

import jax
import jinja2.sandbox
import numpy as np

from trafl_jax import checkpoint as ckpt_lib
from trafl_jax import cli, convert, data, jsonl, lora, sampler, sharding
from trafl_jax import model as model_lib
from trafl_jax import state as state_lib

# Tokens after which a chat model's answer is over, besides the model's EOS.
_END_OF_TURN = ("<|eot_id|>", "<|endoftext|>")


@dataclasses.dataclass(frozen=True)
class Completion:
  prompt: str
  text: str
  tokens: np.ndarray  # the whole completion region, EOS fill included
  commit_steps: np.ndarray  # the denoising step that committed each completion position
  # each position's log-probability under the distribution it was drawn from (sampler.generate)
  log_probs: np.ndarray


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _tokenizer_dirs(path: str) -> list[str]:
  """The checkpoint dir and, for our runs, the workdir above `checkpoints/<step>`."""
  path = os.path.abspath(path)
  return [path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))]


def find_tokenizer(checkpoint: str, cfg: model_lib.ModelConfig, path: str | None = None):
  """`(tokenizer, file)` for `checkpoint`: `path` if given, else `tokenizer.json` or our cached spm
  model beside it; `(None, "")` when there is none (the token-id API still works)."""
  ids = dict(mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)
  candidates = [path] if path else []
  for d in _tokenizer_dirs(checkpoint):
    candidates += [os.path.join(d, "tokenizer.json"), os.path.join(d, "tokenizer", "spm.model")]
  for candidate in candidates:
    if candidate and os.path.isfile(candidate):
      kind = "hf" if candidate.endswith(".json") else "sentencepiece"
      return data.get_tokenizer(kind, candidate, "", None, cfg.vocab_size, **ids), candidate
  if path:
    raise ValueError(f"tokenizer {path} does not exist")
  return None, ""


def _chat_template(tokenizer_file: str):
  """LLaDA-Instruct's chat template and BOS token from tokenizer_config.json next to tokenizer.json."""
  config_path = os.path.join(os.path.dirname(tokenizer_file), "tokenizer_config.json")
  if not tokenizer_file.endswith(".json") or not os.path.isfile(config_path):
    return None, ""
  config = _read_json(config_path)
  template = config.get("chat_template")
  bos = config.get("bos_token") or ""
  bos = bos.get("content", "") if isinstance(bos, Mapping) else bos
  if not template:
    return None, bos
  # Rendered the way transformers renders chat templates: a sandbox, blocks trimmed.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  return env.from_string(template), bos


def _restore(checkpoint: str, stored, cfg, mesh, rules, on_host: bool = False):
  """The checkpoint's parameters in `cfg`'s dtype and layer layout, sharded by `rules` on `mesh` (or,
  `on_host`, whole in this process's host memory: a CPU device). A stored layer layout other than the
  config's (`scan_layers`) is restacked. A lora run's checkpoint (adapters only) comes with its base
  (`convert.lora_run_params`)."""

  def targets(model_cfg):
    target, shardings = state_lib.param_target(model_lib.Transformer(model_cfg), mesh, rules)
    if on_host:
      host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
      shardings = jax.tree.map(lambda _: host, shardings)
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), target)
    return target, shardings

  target, shardings = targets(cfg)
  as_stored = dataclasses.replace(cfg, scan_layers=stored.scan_layers)
  if stored.scan_layers != cfg.scan_layers:
    target, _ = targets(as_stored)
  if stored.lora_rank and not convert.is_model_dir(checkpoint):  # adapters, on the run's base
    base_cfg = lora.base_config(as_stored)
    params = convert.lora_run_params(
      checkpoint,
      target,
      lambda base: _restore(base, convert.model_config_from_dir(base), base_cfg, mesh, rules),
    )
  else:
    params = ckpt_lib.restore_params(checkpoint, target)
  if stored.scan_layers == cfg.scan_layers:
    return params
  restack = functools.partial(model_lib.restack, n_layers=cfg.n_layers, scan_layers=cfg.scan_layers)
  return jax.jit(restack, out_shardings=shardings)(params)


class Generator:
  """A model, its parameters (sharded over the local devices) and its tokenizer (None for a checkpoint
  without one: `generate_ids` works, the text API says what is missing), ready to sample."""

  def __init__(
    self, cfg: model_lib.ModelConfig, params, tokenizer, mesh, rules, tokenizer_file="", source=""
  ):
    self.cfg = cfg
    self.model = model_lib.Transformer(cfg)
    self.params = params
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.rules = rules
    self.param_shardings = jax.tree.map(lambda x: x.sharding, params)
    self.tokenizer_file = tokenizer_file
    self.source = source
    self.template, self.bos_token = _chat_template(tokenizer_file)
    ends = [tokenizer.token_id(t) for t in _END_OF_TURN] if tokenizer is not None else []
    self.end_ids = sorted({i for i in ends + [cfg.eos_token_id] if i is not None})
    self._fns = {}

  @classmethod
  def load(
    cls,
    checkpoint: str,
    tokenizer: str | None = None,
    dtype: str | None = None,
    *,
    settings: model_lib.ModelSettings | None = None,
    layout: sharding.Layout | None = None,
    on_host: bool = False,
  ) -> Generator:
    """Loads any checkpoint `trafl_jax` reads: a workdir or step dir of a run, a converted directory,
    or a Hugging Face LLaDA directory. The checkpoint gives the model's shape; `settings` (a run's
    config) how it is computed, its shape fields checked against the checkpoint's (default: as stored);
    `dtype` overrides the compute dtype; `layout` the mesh and rules (default: data parallel).
    `on_host` keeps the parameters in host memory (what post-training with adapters prepares its base
    from: `lora.place_base`); such a generator cannot sample until they are placed."""
    if not os.path.exists(checkpoint):
      raise ValueError(f"checkpoint {checkpoint} does not exist")
    stored = convert.model_config_from_dir(checkpoint)
    cfg = stored if settings is None else settings.resolve(stored, checkpoint)
    if dtype:
      cfg = dataclasses.replace(cfg, dtype=dtype)
    tok, tokenizer_file = find_tokenizer(checkpoint, cfg, tokenizer)
    layout = layout or sharding.Layout()
    mesh = layout.make_mesh()
    params = _restore(checkpoint, stored, cfg, mesh, layout.rules, on_host)
    return cls(cfg, params, tok, mesh, layout.rules, tokenizer_file, source=checkpoint)

  def _require_tokenizer(self):
    if self.tokenizer is None:
      raise ValueError(
        f"checkpoint {self.source} has no tokenizer (looked for tokenizer.json and "
        "tokenizer/spm.model in it and its parent directories): give one (--tokenizer) for text, "
        "or use token ids (generate_ids, --prompt_ids)"
      )
    return self.tokenizer

  def encode(self, text: str, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt, wrapped in the chat template when there is one."""
    return self._require_tokenizer().encode(self.format_prompt(text, chat))

  def format_prompt(self, text: str, chat: bool | None = None) -> str:
    """Wraps `text` in the chat template when there is one (or when `chat` says so)."""
    if chat is False or (chat is None and self.template is None):
      return text
    if self.template is None:
      raise ValueError("chat formatting was asked for but the tokenizer has no chat_template")
    messages = [{"role": "user", "content": text}]
    return self.template.render(
      messages=messages, add_generation_prompt=True, bos_token=self.bos_token
    )

  def _fn(self, scfg: sampler.SamplerConfig):
    if scfg not in self._fns:
      self._fns[scfg] = sampler.make_generate_fn(
        self.model, scfg, self.mesh, self.rules, self.param_shardings
      )
    return self._fns[scfg]

  def generate(
    self,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool | None = None,
    **settings,
  ) -> list[Completion]:
    """Completions of text prompts; `settings` are `generate_ids`'s sampler settings."""
    encoded = [self.encode(p, chat) for p in prompts]
    tokens, commit_steps, log_probs = self.generate_ids(
      encoded, seed=seed, batch_size=batch_size, **settings
    )
    return [
      Completion(p, self.decode(t), t, c, lp)
      for p, t, c, lp in zip(prompts, tokens, commit_steps, log_probs)
    ]

  def generate_ids(
    self,
    prompt_ids: Sequence[Sequence[int]],
    *,
    gen_length: int = 128,
    steps: int = 64,
    block_length: int = 32,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    **modes,
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(completion_NxL, commit_step_NxL, logp_NxL)` for prompts given as token ids (no tokenizer
    needed): the whole completion region (EOS fill included), the denoising step that committed each
    position and its log-probability when it was drawn (`sampler.generate`). `modes` are the
    sampler's other settings (`sampler.SECTION_FIELDS`: cache, threshold, stop_at_eos, schedule,
    top_p, ...)."""
    unknown = sorted(set(modes) - set(sampler.SECTION_FIELDS))
    if unknown:
      raise ValueError(f"unknown sampler settings {unknown}; known: {list(sampler.SECTION_FIELDS)}")
    scfg = sampler.SamplerConfig(
      gen_length=gen_length,
      steps=steps,
      block_length=block_length,
      temperature=temperature,
      remasking=remasking,
      cfg_scale=cfg_scale,
      **modes,
    )
    generate = self._fn(scfg)
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    batch_size = -(-max(batch_size, 1) // shards) * shards
    tokens, commit_steps, log_probs = [], [], []
    for start in range(0, len(prompt_ids), batch_size):
      chunk = prompt_ids[start : start + batch_size]
      prompt_BxP, valid_BxP = self.pad_prompts(chunk, batch_size)
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), start)
      out = generate(self.params, prompt_BxP, valid_BxP, rng)
      out = map(sharding.to_host, (out.completion_BxL, out.commit_step_BxL, out.logp_BxL))
      for acc, value in zip((tokens, commit_steps, log_probs), out):
        acc.append(value[: len(chunk)])
    if not tokens:
      empty = np.zeros((0, gen_length), np.int32)
      return empty, empty, empty.astype(np.float32)
    return np.concatenate(tokens), np.concatenate(commit_steps), np.concatenate(log_probs)

  def pad_prompts(self, encoded: Sequence[Sequence[int]], rows: int, width: int | None = None):
    """Left-pads token lists into `[rows, width]` (width: the longest rounded up to 32, so a stream of
    prompts compiles a few shapes, not one each). Filler rows get one valid position."""
    width = width or -(-max(len(c) for c in encoded) // 32) * 32
    if max(len(c) for c in encoded) > width:
      raise ValueError(f"a prompt of {max(len(c) for c in encoded)} tokens does not fit in {width}")
    prompt_BxP = np.full((rows, width), self.cfg.pad_token_id, np.int32)
    valid_BxP = np.zeros((rows, width), bool)
    for row, ids in enumerate(encoded):
      prompt_BxP[row, width - len(ids) :] = ids
      valid_BxP[row, width - len(ids) :] = True
    valid_BxP[len(encoded) :, -1] = True  # keeps attention defined on filler rows
    return prompt_BxP, valid_BxP

  def until_end(self, tokens: np.ndarray) -> np.ndarray:
    """The completion's tokens up to its first end token (EOS or end of turn)."""
    ends = np.isin(tokens, self.end_ids)
    return np.asarray(tokens[: int(ends.argmax()) if ends.any() else len(tokens)])

  def decode(self, tokens: np.ndarray) -> str:
    """The completion's text up to its first end token."""
    return self._require_tokenizer().decode(self.until_end(tokens).tolist())


def read_prompts(path: str) -> list[str]:
  """One prompt per line, or JSONL with a "prompt" (or "question" / "problem") field."""
  if not os.path.isfile(path):
    raise ValueError(f"prompts file {path} does not exist")
  prompts = []
  if path.endswith((".jsonl", ".jsonl.gz")):
    for where, record in jsonl.read(path):
      keys = [k for k in ("prompt", "question", "problem") if k in record]
      if not keys:
        raise ValueError(f"{where}: no 'prompt', 'question' or 'problem' field")
      prompts.append(str(record[keys[0]]))
    return prompts
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        prompts.append(line.rstrip("\n").replace("\\n", "\n"))
  return prompts


def _parse_ids(spec: str) -> list[int]:
  try:
    return [int(x) for x in spec.replace(",", " ").split()]
  except ValueError:
    raise ValueError(f"--prompt_ids {spec!r}: expected integers separated by commas") from None


def _flag_settings(f) -> model_lib.ModelSettings | None:
  """The compute flags as model settings over the checkpoint's shape (None: as stored)."""
  given = {k: f[k].value for k in ("dtype", "param_dtype", "remat") if f[k].value}
  if not given:
    return None
  return model_lib.ModelSettings(shape=(), **{"remat": "none", **given})


def main(argv) -> None:
  del argv
  from absl import flags

  cli.quiet_libraries()
  f = flags.FLAGS
  settings = dict(
    gen_length=f.gen_length,
    steps=f.steps,
    block_length=f.block_length,
    temperature=f.temperature,
    remasking=f.remasking,
    cfg_scale=f.cfg_scale,
    seed=f.seed,
    batch_size=f.batch_size,
    **{k: f[k].value for k in sampler.SECTION_FIELDS},
  )
  try:
    prompts = list(f.prompt or []) + (read_prompts(f.prompts_file) if f.prompts_file else [])
    ids = [_parse_ids(p) for p in f.prompt_ids or []]
    if not prompts and not ids:
      raise ValueError("give --prompt (repeatable), --prompts_file or --prompt_ids")
    layout = sharding.Layout(mesh=(("data", -1), ("fsdp", f.fsdp), ("tensor", f.tensor)))
    generator = Generator.load(f.checkpoint, f.tokenizer, settings=_flag_settings(f), layout=layout)
    if prompts:
      chat = {"auto": None, "true": True, "false": False}[f.chat]
      texts = [p.replace("\\n", "\n") for p in prompts]
      completions = generator.generate(texts, chat=chat, **settings)
    if ids:
      tokens, _, _ = generator.generate_ids(ids, **settings)
  except (ValueError, FileNotFoundError, ckpt_lib.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for i, c in enumerate(completions if prompts else []):
    print(f"=== {i}: {c.prompt.strip()}\n{c.text}")
  for i, row in enumerate(tokens if ids else []):
    print(
      f"=== ids {i}: {' '.join(map(str, ids[i]))}\n{' '.join(map(str, generator.until_end(row)))}"
    )


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("checkpoint", None, "Workdir, step dir, converted dir or HF LLaDA dir.")
  flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable); '\\n' is a newline.")
  flags.DEFINE_string("prompts_file", None, "Text file (one prompt a line) or JSONL.")
  flags.DEFINE_string("tokenizer", None, "tokenizer.json or spm .model (default: found beside it).")
  flags.DEFINE_integer("gen_length", 128, "Completion length.")
  flags.DEFINE_integer("steps", 64, "Denoising steps.")
  flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_enum("remasking", "low_confidence", list(sampler.REMASKING), "Remasking rule.")
  flags.DEFINE_float("cfg_scale", 0.0, "Classifier-free guidance scale.")
  flags.DEFINE_enum("cache", "none", list(sampler.CACHES), "Key/value cache: none, prefix, dual.")
  flags.DEFINE_integer("refresh_every", 0, "Cache refresh every N steps of a block (0: per block).")
  flags.DEFINE_float("threshold", 0.0, "Commit every position above this confidence (0: off).")
  flags.DEFINE_enum(
    "threshold_floor",
    "one",
    list(sampler.THRESHOLD_FLOORS),
    "What a thresholded step commits at least: one position, or the exact schedule's count.",
  )
  flags.DEFINE_bool("stop_at_eos", False, "Rows that finished their answer stop computing.")
  flags.DEFINE_integer("micro_batch", 0, "Sampler rows per pass (0: the whole batch).")
  flags.DEFINE_enum(
    "schedule", "llada", list(sampler.SCHEDULES), "Commit counts: LLaDA's blocks or Dream's."
  )
  flags.DEFINE_float("top_p", 1.0, "Nucleus filter before drawing (1: off).")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens before drawing (0: off).")
  flags.DEFINE_float("alg_temp", 0.0, "Draw positions by confidence at this temperature (0: top).")
  flags.DEFINE_float("eps", 1e-3, "Dream's last timestep (schedule dream).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("batch_size", 8, "Prompts per sampler call (rounded up to the devices).")
  flags.DEFINE_enum("chat", "auto", ["auto", "true", "false"], "Apply the chat template.")
  flags.DEFINE_multi_string(
    "prompt_ids", None, "A prompt as token ids, e.g. '12,7,93' (repeatable; needs no tokenizer)."
  )
  flags.DEFINE_string("dtype", None, "Compute dtype (default: the checkpoint's).")
  flags.DEFINE_string("param_dtype", None, "Parameter dtype (default: the checkpoint's).")
  flags.DEFINE_string("remat", None, "Remat policy (default: none).")
  flags.DEFINE_integer("fsdp", 1, "FSDP degree (parameters split over it).")
  flags.DEFINE_integer("tensor", 1, "Tensor-parallel degree (the rest of the devices: data).")
  flags.mark_flag_as_required("checkpoint")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
