"""Low-rank adapters for post-training (`config.lora`): which projections get them, and how a parameter
tree splits into the frozen base and the trainable adapters.

The adapters live in the model's parameter tree beside the kernels they adapt (`.../q_proj/lora_a`,
`.../q_proj/lora_b`; model.Dense). The policy is the whole tree; the reference is the same tree without
the adapters (`base_of`): one copy of the base, no second frozen model. Post-training differentiates,
optimizes and checkpoints the adapters only (`split_trainable`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from trafl_jax import model as model_lib
from trafl_jax import quant, sharding

ADAPTERS = ("lora_a", "lora_b")
BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
QUANTIZED = ("int8", "nf4")  # the layers' kernels quantized (quant.py), the rest bfloat16


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0  # 0: no adapters (full post-training)
  alpha: float = 0.0  # the update is scaled by alpha / rank
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # model.PROJECTIONS, by LLaDA's names
  base_dtype: str = "bfloat16"  # the frozen base's parameters (int8: quantized layer kernels)

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.rank < 0:
      raise ValueError(f"lora.rank {self.rank} must be >= 0 (0: no adapters)")
    if self.rank and self.alpha <= 0:
      raise ValueError(
        f"lora.alpha {self.alpha} must be > 0 with adapters (the scale is alpha/rank)"
      )
    unknown = sorted(set(self.targets) - set(model_lib.PROJECTIONS))
    if unknown or (self.rank and not self.targets):
      raise ValueError(
        f"lora.targets {list(self.targets)}: name one or more of {list(model_lib.PROJECTIONS)}"
      )
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f"lora.base_dtype {self.base_dtype!r} is not one of {BASE_DTYPES}")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  def adapt(self, cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
    """The model with these adapters (unchanged when rank is 0)."""
    if not self.enabled:
      return cfg
    return dataclasses.replace(
      cfg,
      lora_rank=self.rank,
      lora_alpha=float(self.alpha),
      lora_targets=self.targets,
      base_quant=self.base_dtype if self.base_dtype in QUANTIZED else "none",
    )


def base_config(cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
  """The model without adapters or a quantized base: what a base checkpoint stores."""
  return dataclasses.replace(cfg, lora_rank=0, lora_alpha=0.0, lora_targets=(), base_quant="none")


def prepare_base(params, base_dtype: str):
  """A full-precision base as a lora run holds it: cast to `base_dtype`, or (int8, nf4) every layer
  kernel quantized (`quant.quantize`: `kernel_q` and `kernel_scale`) and the other parameters in
  bfloat16. Jittable."""
  if base_dtype not in QUANTIZED:
    return jax.tree.map(lambda x: x.astype(base_dtype), params)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, x in flat.items():
    if path[-1] in ("kernel_q", "kernel_scale"):  # quantized already
      out[path] = x
    elif path[-1] == "kernel" and path[0].startswith("blocks"):
      q, scale = quant.quantize(base_dtype, x)
      out[(*path[:-1], "kernel_q")], out[(*path[:-1], "kernel_scale")] = q, scale
    else:
      out[path] = x.astype(jnp.bfloat16)
  return traverse_util.unflatten_dict(out)


def place_base(host_params, base_dtype: str, shardings):
  """`prepare_base` one tensor at a time where the full-precision base is (host memory), each result
  then placed on its devices (`shardings`: `base_of` the state's): the accelerators never hold the
  full-precision base, only what the run keeps (a 16 GB chip cannot hold LLaDA-8B in bfloat16 and its
  quantized copy at once). Every process holds the whole base on its host."""
  flat = traverse_util.flatten_dict(host_params)
  target = traverse_util.flatten_dict(shardings)
  one = jax.jit(prepare_base, static_argnums=1)
  out = {}
  for path, x in flat.items():
    prepared = one(traverse_util.unflatten_dict({path: x}), base_dtype)
    for leaf, y in traverse_util.flatten_dict(prepared).items():  # a kernel: kernel_q, kernel_scale
      out[leaf] = sharding.to_global(jax.device_get(y), target[leaf])
  return traverse_util.unflatten_dict(out)


def _dequantized(flat: dict) -> dict:
  """`kernel_q`/`kernel_scale` pairs back to float32 kernels (the kind told by `kernel_q`'s dtype)."""
  out = {p: x for p, x in flat.items() if p[-1] not in ("kernel_q", "kernel_scale")}
  for path, q in flat.items():
    if path[-1] == "kernel_q":
      scale = flat[(*path[:-1], "kernel_scale")]
      kind = "int8" if q.dtype == jnp.int8 else "nf4"
      out[(*path[:-1], "kernel")] = quant.dequantize(kind, q, scale, jnp.float32)
  return out


def _is_adapter(path: tuple) -> bool:
  return path[-1] in ADAPTERS


def has_adapters(params) -> bool:
  return any(_is_adapter(p) for p in traverse_util.flatten_dict(params))


def _select(params, keep):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: x for p, x in flat.items() if keep(p)})


def adapters_of(params):
  return _select(params, _is_adapter)


def base_of(params):
  """The tree without its adapters: the base model (the reference, adapters off)."""
  return _select(params, lambda p: not _is_adapter(p))


def combine(base, adapters):
  """`base` with `adapters` inserted (the inverse of `adapters_of` / `base_of`)."""
  if base is None:
    return adapters
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(adapters))
  return traverse_util.unflatten_dict(flat)


def split_trainable(params):
  """`(trainable, frozen)`: the adapters and the base when the tree has adapters, else the whole tree
  and None. `combine(frozen, trainable)` is the tree again."""
  if not has_adapters(params):
    return params, None
  return adapters_of(params), base_of(params)


def init_adapters(abstract_params, rng: jax.Array):
  """Fresh adapters for the adapter leaves of `abstract_params` (shapes only; the base is never
  initialized): PEFT's init, A ~ U(-1/sqrt(I), 1/sqrt(I)) and B = 0, so the policy starts as the base."""
  flat = traverse_util.flatten_dict(adapters_of(abstract_params))
  out = {}
  for i, (path, leaf) in enumerate(sorted(flat.items())):
    if path[-1] == "lora_b":
      out[path] = jnp.zeros(leaf.shape, jnp.float32)
    else:
      bound = leaf.shape[-2] ** -0.5
      key = jax.random.fold_in(rng, i)
      out[path] = jax.random.uniform(key, leaf.shape, jnp.float32, -bound, bound)
  return traverse_util.unflatten_dict(out)


def merged(params, cfg: model_lib.ModelConfig):
  """The tree with every adapter folded into its kernel, `W + (alpha / r) A @ B` in float32 and cast
  back to the kernel's dtype (an int8 base's kernels dequantized, float32), and the adapters removed: the
  base model (`base_config`) that computes the policy."""
  flat = _dequantized(traverse_util.flatten_dict(params))
  scale = cfg.lora_alpha / max(cfg.lora_rank, 1)
  out = {p: x for p, x in flat.items() if not _is_adapter(p)}
  for path in flat:
    if path[-1] != "lora_a":
      continue
    module = path[:-1]
    a, b, kernel = flat[path], flat[(*module, "lora_b")], flat[(*module, "kernel")]
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    out[(*module, "kernel")] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(out)


def fingerprint(base) -> np.ndarray:
  """Per-leaf mean and mean square of a base's parameters (float64 on the host, in the tree's sorted
  leaf order): what a resumed run compares to refuse adapters trained on a different base."""
  flat = sorted(traverse_util.flatten_dict(base).items())
  stats = jax.jit(
    lambda xs: jnp.stack(
      [
        jnp.stack([jnp.mean(x.astype(jnp.float32)), jnp.mean(jnp.square(x.astype(jnp.float32)))])
        for x in xs
      ]
    )
  )([x for _, x in flat])
  return np.asarray(jax.device_get(stats), np.float64)


def same_base(a: np.ndarray, b: np.ndarray) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-4, atol=1e-7))
