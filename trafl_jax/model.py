"""LLaDA-layout masked diffusion transformer in Flax linen.

Bidirectional pre-norm transformer (OLMo/LLaDA layout) that predicts the token at every position; the
caller decides which positions are masked. Parameter names follow LLaDA's Hugging Face checkpoints so that
conversion is a rename and a transpose.

Dimension legend:
  B: batch            T: sequence length        D: d_model
  N: query heads      K: key/value heads        H: head dim
  F: MLP hidden       V: vocabulary             L: layers (stacked when scanning)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from trafl_jax import diffusion, quant

Dtype = Any

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# The projections of a layer, by LLaDA's names (what low-rank adapters can target).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
BASE_QUANT = ("none", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  mlp_hidden: int
  mask_token_id: int
  eos_token_id: int
  pad_token_id: int = 0
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  # The family's differences (FAMILIES): LLaDA has none of them; Dream (a Qwen2 decoder used
  # bidirectionally) biases q/k/v, may tie the head to the embedding, and predicts token i from
  # position i - 1 (`shift_logits`: the logits at i are the head of position i - 1's hidden state;
  # position 0 keeps its own).
  family: str = "llada"
  qkv_bias: bool = False
  tie_embeddings: bool = False
  shift_logits: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = True
  # Score log-probabilities (`Transformer(..., targets_BxS=...)`) over chunks of this many positions,
  # never holding a whole sequence's vocabulary-wide logits; 0 = all positions at once.
  logits_chunk: int = 0
  # Low-rank adapters (lora.py): rank 0 is none. Set by post-training, never by a checkpoint's shape.
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: tuple[str, ...] = ()
  # The frozen base's layer projections stored quantized under adapters: "none" | "int8" | "nf4"
  # (quant.py: `kernel_q` and `kernel_scale`, dequantized in the matmul's dtype).
  base_quant: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON gives a list
    unknown = sorted(set(self.lora_targets) - set(PROJECTIONS))
    if unknown:
      raise ValueError(f"lora targets {unknown} are not projections of the model {PROJECTIONS}")
    if self.base_quant not in BASE_QUANT:
      raise ValueError(f"base_quant {self.base_quant!r} is not one of {BASE_QUANT}")
    if self.lora_rank < 0 or (self.lora_rank and not self.lora_targets):
      raise ValueError(f"lora rank {self.lora_rank} needs rank >= 0 and, above 0, some targets")
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
    if (self.d_model // self.n_heads) % 2:
      raise ValueError(f"head_dim {self.d_model // self.n_heads} must be even for RoPE")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
    if self.family not in FAMILIES:
      raise ValueError(f"model family {self.family!r} is not one of {sorted(FAMILIES)}")
    if self.logits_chunk < 0:
      raise ValueError(f"logits_chunk {self.logits_chunk} must be >= 0 (0: no chunks)")
    for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
      if not 0 <= getattr(self, name) < self.vocab_size:
        raise ValueError(
          f"{name} {getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"
        )

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def num_params(self) -> int:
    d, f, v, hd = self.d_model, self.mlp_hidden, self.vocab_size, self.head_dim
    attn = d * d * 2 + 2 * d * self.n_kv_heads * hd
    bias = (d + 2 * self.n_kv_heads * hd) if self.qkv_bias else 0
    per_layer = attn + bias + 3 * d * f + 2 * d
    return self.n_layers * per_layer + (1 if self.tie_embeddings else 2) * v * d + d


# How a ModelConfig's fields divide: a checkpoint fixes the shape (its arrays and token ids); the run's
# config says how it is computed. FOLLOW in a shape field of `ModelSettings` means "the checkpoint's".
SHAPE_FIELDS = (
  "vocab_size",
  "d_model",
  "n_layers",
  "n_heads",
  "n_kv_heads",
  "mlp_hidden",
  "mask_token_id",
  "eos_token_id",
  "pad_token_id",
  "rope_theta",
  "rms_norm_eps",
  "family",
  "qkv_bias",
  "tie_embeddings",
  "shift_logits",
)
# Model families: the Hugging Face `model_type` each converts from and to.
FAMILIES = {"llada": "llada", "dream": "Dream"}
# The fields that make a model Dream-shaped (presets and Dream's config.json set them).
DREAM_FIELDS = dict(family="dream", qkv_bias=True, shift_logits=True)
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "logits_chunk")
FOLLOW = -1


# Size presets (configs choose one with model.preset). `tiny` is for tests, `mini` for the CPU default
# job (DESIGN section 5 sizing), `small` for CPU demos and benchmarks, `1b` for GPU benchmarks,
# `llada_8b` is LLaDA-8B's shape, `checkpoint` follows the checkpoint.
PRESETS = {
  "tiny": dict(
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    mlp_hidden=128,
    mask_token_id=4,
    eos_token_id=3,
    pad_token_id=0,
    rope_theta=10000.0,
  ),
  "mini": dict(
    vocab_size=128,
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    mlp_hidden=384,
    mask_token_id=4,
    eos_token_id=3,
    pad_token_id=0,
    rope_theta=10000.0,
  ),
  "small": dict(
    vocab_size=1024,
    d_model=512,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    mlp_hidden=1536,
    mask_token_id=4,
    eos_token_id=3,
    pad_token_id=0,
    rope_theta=10000.0,
  ),
  "1b": dict(
    vocab_size=32768,
    d_model=2048,
    n_layers=18,
    n_heads=16,
    n_kv_heads=16,
    mlp_hidden=5632,
    mask_token_id=4,
    eos_token_id=3,
    pad_token_id=0,
    rope_theta=500000.0,
  ),
  # A Dream-family model for tests (a Qwen2 decoder used bidirectionally, shifted predictions).
  "dream_tiny": dict(
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    mlp_hidden=128,
    mask_token_id=4,
    eos_token_id=3,
    pad_token_id=0,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    **DREAM_FIELDS,
  ),
  # Dream-v0-7B (Qwen2.5-7B's shape, Dream's special ids; DiffuCoder-7B is the same shape).
  "dream_7b": dict(
    vocab_size=152064,
    d_model=3584,
    n_layers=28,
    n_heads=28,
    n_kv_heads=4,
    mlp_hidden=18944,
    mask_token_id=151666,
    eos_token_id=151643,
    pad_token_id=151643,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    **DREAM_FIELDS,
  ),
  "llada_8b": dict(
    vocab_size=126464,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=32,
    mlp_hidden=12288,
    mask_token_id=126336,
    eos_token_id=126081,
    pad_token_id=126081,
    rope_theta=500000.0,
  ),
}
PRESETS["checkpoint"] = {
  k: FOLLOW for k in SHAPE_FIELDS
}  # post-training / evaluating a given model
PRESETS["checkpoint"].update(rope_theta=float(FOLLOW), rms_norm_eps=float(FOLLOW))


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """What a run's config says of the model: a shape (field -> value; FOLLOW = the checkpoint's) and the
  compute settings, which always come from the config."""

  shape: tuple[tuple[str, Any], ...]
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = True
  logits_chunk: int = 0

  def __post_init__(self):
    unknown = sorted({k for k, _ in self.shape} - set(SHAPE_FIELDS))
    if unknown:
      raise ValueError(f"model shape fields {unknown} are not ModelConfig fields")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat {self.remat!r} is not one of {REMAT_POLICIES}")

  def compute(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in COMPUTE_FIELDS}

  def build(self) -> ModelConfig:
    """The model of a run that makes its own parameters: no shape field may be FOLLOW."""
    shape = dict(self.shape)
    missing = [k for k, v in self.shape if v == FOLLOW]
    if missing:
      raise ValueError(
        f"config.model leaves {missing} to a checkpoint ({FOLLOW}), but this stage builds a new "
        "model; give a model.preset with a shape"
      )
    return ModelConfig(**shape, **self.compute())

  def resolve(self, stored: ModelConfig, where: str) -> ModelConfig:
    """The checkpoint's shape with these compute settings. A shape field the config sets (non-zero)
    must equal the checkpoint's unless it is FOLLOW: the error names both values."""
    wrong = [
      f"{k}: config {v!r} vs checkpoint {getattr(stored, k)!r}"
      for k, v in self.shape
      if v != FOLLOW and v != getattr(stored, k)
    ]
    if wrong:
      raise ValueError(
        f"config.model does not match the checkpoint {where} ({'; '.join(wrong)}); set the "
        "checkpoint's values, or --config.model.preset=checkpoint to follow the checkpoint"
      )
    return dataclasses.replace(stored, **self.compute())


class Dense(nn.Module):
  """A bias-free projection `x @ W` (`kernel`, [I, O]) on rows flattened to 2-D: `[B*T, I] @ [I, O]`
  keeps the weight-gradient contraction a single plain matmul (contracting over two dims ran at half
  speed on CPU).

  With `adapt` (a layer projection the config's `lora_targets` names) the output gains the low-rank
  update `(alpha / r) (x @ A) @ B` (`lora_a` [I, r], `lora_b` [r, O], float32, B zero at init), when the
  adapters are in the parameters: applied to a tree without them the module is the base projection (the
  reference is the base with adapters off, from the same arrays)."""

  features: int
  axes: tuple[str, str]
  cfg: ModelConfig
  adapt: bool = False
  layer: bool = False  # a layer's projection (quantized with cfg.base_quant), not the output head
  use_bias: bool = False  # `x @ W + b` (Dream's q/k/v; `bias` [O], never quantized or adapted)

  @nn.compact
  def __call__(self, x_BxTxI: jax.Array) -> jax.Array:
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    leading, width = x_BxTxI.shape[:-1], x_BxTxI.shape[-1]
    if self.layer and cfg.base_quant != "none":
      shapes = quant.quant_shapes(cfg.base_quant, width, self.features)
      (q_shape, q_dtype), (scale_shape, _) = shapes["kernel_q"], shapes["kernel_scale"]
      q = self.param(
        "kernel_q",
        nn.with_logical_partitioning(nn.initializers.zeros, self.axes),
        q_shape,
        jnp.dtype(q_dtype),
      )
      scale = self.param(
        "kernel_scale",
        # Sharded like the output channels; an nf4 block axis is replicated (it can be too short).
        nn.with_logical_partitioning(
          nn.initializers.ones, (None,) * (len(scale_shape) - 1) + (self.axes[1],)
        ),
        scale_shape,
        jnp.float32,
      )
      kernel_IxO = quant.dequantize(cfg.base_quant, q, scale, dtype)
    else:
      kernel_IxO = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
        (width, self.features),
        jnp.dtype(cfg.param_dtype),
      )
    x_NxI = x_BxTxI.reshape(-1, width).astype(dtype)
    y_NxO = jnp.dot(x_NxI, kernel_IxO.astype(dtype))
    if self.adapt and (self.is_initializing() or self.has_variable("params", "lora_a")):
      r = cfg.lora_rank
      # PEFT's init: A ~ U(-1/sqrt(I), 1/sqrt(I)) (kaiming-uniform with a = sqrt 5), B = 0.
      a_init = nn.initializers.uniform(2.0 / width**0.5)
      a_IxR = self.param(
        "lora_a",
        nn.with_logical_partitioning(
          lambda *a: a_init(*a) - 1.0 / width**0.5, (self.axes[0], "lora")
        ),
        (width, r),
        jnp.float32,
      )
      b_RxO = self.param(
        "lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora", self.axes[1])),
        (r, self.features),
        jnp.float32,
      )
      low_NxR = jnp.dot(x_NxI, a_IxR.astype(dtype))
      y_NxO = y_NxO + (cfg.lora_alpha / r) * jnp.dot(low_NxR, b_RxO.astype(dtype))
    if self.use_bias:
      bias_O = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
        (self.features,),
        jnp.dtype(cfg.param_dtype),
      )
      y_NxO = y_NxO + bias_O.astype(dtype)
    return y_NxO.reshape(*leading, self.features)


def _dense(
  x_BxTxI: jax.Array,
  features: int,
  axes: tuple[str, str],
  cfg: ModelConfig,
  name: str,
  bias: bool = False,
) -> jax.Array:
  """A layer's projection `name` (adapted when the config targets it)."""
  adapt = cfg.lora_rank > 0 and name in cfg.lora_targets
  return Dense(features, axes, cfg, adapt, layer=True, use_bias=bias, name=name)(x_BxTxI)


class RMSNorm(nn.Module):
  """`w * x * rsqrt(mean(x^2) + eps)` in float32, as LLaDA computes it."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      (x_BxTxD.shape[-1],),
      jnp.dtype(self.cfg.param_dtype),
    )
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    return (scale_D.astype(jnp.float32) * x).astype(jnp.dtype(self.cfg.dtype))


def rope(x_BxTxNxH: jax.Array, theta: float, offset: jax.Array | int = 0) -> jax.Array:
  """Rotate-half RoPE with positions offset..offset+T-1, in float32 (dimension i pairs with i + H/2).
  `offset` may be traced: the sampler's caches compute a slice of the sequence at its own positions."""
  t, h = x_BxTxNxH.shape[1], x_BxTxNxH.shape[-1]
  inv_freq_h = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  positions_T = (offset + jnp.arange(t)).astype(jnp.float32)
  angles_TxH = jnp.outer(positions_T, inv_freq_h)
  angles_TxH = jnp.concatenate([angles_TxH, angles_TxH], axis=-1)[None, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(angles_TxH) + rotated * jnp.sin(angles_TxH)).astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
  """Bidirectional attention of S query positions (`start`..`start+S-1`) over the T-long sequence.

  Without `cache_kv` the queries are the whole sequence (S = T, start 0). With it (keys and values of
  all T positions from an earlier pass: the sampler's prefix and dual caches) the S positions' fresh
  keys and values are written over theirs and the rest are reused. Returns the output and the S
  positions' keys and values (a full pass returns the cache)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxSxD: jax.Array, valid_BxT: jax.Array, cache_kv=None, start=0):
    cfg = self.cfg
    b, s, _ = x_BxSxD.shape
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    # 2-D kernels reshaped afterwards: >2-D logically partitioned DenseGeneral kernels fail under a mesh.
    proj = functools.partial(_dense, x_BxSxD, cfg=cfg, bias=cfg.qkv_bias)
    q_BxSxNxH = proj(n * h, ("embed", "heads"), name="q_proj").reshape(b, s, n, h)
    k_BxSxKxH = proj(k * h, ("embed", "kv_heads"), name="k_proj").reshape(b, s, k, h)
    v_BxSxKxH = proj(k * h, ("embed", "kv_heads"), name="v_proj").reshape(b, s, k, h)
    q_BxSxNxH = rope(q_BxSxNxH, cfg.rope_theta, start)
    k_BxSxKxH = rope(k_BxSxKxH, cfg.rope_theta, start)
    q_BxSxNxH = nn.with_logical_constraint(q_BxSxNxH, ("batch", "length", "heads", "head_dim"))
    keys_BxTxKxH, values_BxTxKxH = k_BxSxKxH, v_BxSxKxH
    if cache_kv is not None:
      cache_k_BxTxKxH, cache_v_BxTxKxH = cache_kv
      at = (0, start, 0, 0)
      keys_BxTxKxH = jax.lax.dynamic_update_slice(cache_k_BxTxKxH, k_BxSxKxH, at)
      values_BxTxKxH = jax.lax.dynamic_update_slice(cache_v_BxTxKxH, v_BxSxKxH, at)
    # Bidirectional: padding removes keys only. Query head j reads KV head j // (N / K).
    mask_Bx1x1xT = valid_BxT[:, None, None, :]
    out_BxSxNxH = jax.nn.dot_product_attention(
      q_BxSxNxH, keys_BxTxKxH, values_BxTxKxH, mask=mask_Bx1x1xT, scale=h**-0.5
    )
    out_BxSxD = out_BxSxNxH.reshape(b, s, n * h)
    out_BxSxD = _dense(out_BxSxD, cfg.d_model, ("heads", "embed"), cfg, "attn_out")
    return out_BxSxD, (k_BxSxKxH, v_BxSxKxH)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    gate_BxTxF = _dense(x_BxTxD, cfg.mlp_hidden, ("embed", "mlp"), cfg, "ff_proj")
    up_BxTxF = _dense(x_BxTxD, cfg.mlp_hidden, ("embed", "mlp"), cfg, "up_proj")
    h_BxTxF = nn.with_logical_constraint(nn.silu(gate_BxTxF) * up_BxTxF, ("batch", "length", "mlp"))
    return _dense(h_BxTxF, cfg.d_model, ("mlp", "embed"), cfg, "ff_out")


class Block(nn.Module):
  """One layer. Scanned over layers, `cache_kv` is this layer's slice of the stacked cache and the
  second output its keys and values (only when `return_kv`: training never holds them)."""

  cfg: ModelConfig
  return_kv: bool = False

  @nn.compact
  def __call__(self, x_BxSxD: jax.Array, valid_BxT: jax.Array, cache_kv=None, start=0):
    cfg = self.cfg
    x_BxSxD = nn.with_logical_constraint(x_BxSxD, ("batch", "length", "embed"))
    h = RMSNorm(cfg, name="attn_norm")(x_BxSxD)
    attended, kv = Attention(cfg, name="attn")(h, valid_BxT, cache_kv, start)
    x_BxSxD = x_BxSxD + attended
    h = RMSNorm(cfg, name="ff_norm")(x_BxSxD)
    x_BxSxD = x_BxSxD + MLP(cfg, name="mlp")(h)
    return x_BxSxD, (kv if self.return_kv else None)


def _remat_policy(name: str):
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots":
    return jax.checkpoint_policies.checkpoint_dots
  return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims


class Transformer(nn.Module):
  """`(tokens_BxT, valid_BxT) -> logits_BxTxV` (float32), optionally with final hidden states.

  Given `targets_BxS`, it returns `log softmax(logits)[target]` (`[B, S]`, float32) instead: over
  chunks of `cfg.logits_chunk` positions when that is set (a `lax.scan` whose body is rematerialized,
  so neither pass holds more than one chunk's vocabulary-wide logits), else from the whole logits.

  `logits_from` (static) computes logits only for positions `logits_from:` (the sampler needs the
  completion's logits, not the prompt's: the head is the largest matmul at LLaDA's vocabulary size).

  The sampler's caches: `return_kv` also returns every layer's keys and values (`(K, V)`, each
  `[layers, B, T, kv_heads, head_dim]`); given them as `cache_kv`, the model computes only the
  S positions `start`..`start+S-1` whose tokens are `tokens_BxS` (`valid_BxT` stays the whole
  sequence's), attending over the cached keys and values of the others.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxS: jax.Array,
    valid_BxT: jax.Array,
    return_hidden: bool = False,
    logits_from: int = 0,
    cache_kv=None,
    start=0,
    return_kv: bool = False,
    targets_BxS: jax.Array | None = None,
  ):
    cfg = self.cfg
    embedding_VxD = self.param(
      "wte",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
      (cfg.vocab_size, cfg.d_model),
      jnp.dtype(cfg.param_dtype),
    )
    # LLaDA does not scale embeddings; MASK is an ordinary row.
    x_BxSxD = jnp.take(embedding_VxD, tokens_BxS, axis=0).astype(jnp.dtype(cfg.dtype))
    valid_BxT = valid_BxT.astype(jnp.bool_)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      x_BxSxD, kv = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, 0, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, return_kv, name="blocks")(x_BxSxD, valid_BxT, cache_kv, start)
    else:
      layers_kv = []
      for i in range(cfg.n_layers):
        layer_cache = None if cache_kv is None else jax.tree.map(lambda c, i=i: c[i], cache_kv)
        x_BxSxD, layer_kv = block(cfg, return_kv, name=f"blocks_{i}")(
          x_BxSxD, valid_BxT, layer_cache, start
        )
        layers_kv.append(layer_kv)
      kv = jax.tree.map(lambda *xs: jnp.stack(xs), *layers_kv) if return_kv else None

    hidden_BxSxD = RMSNorm(cfg, name="ln_f")(x_BxSxD)
    if cfg.shift_logits:
      # Position i's prediction is the head of position i - 1's state (position 0 keeps its own; with
      # `cache_kv`, the first computed position does: the sampler computes one position more).
      hidden_BxSxD = jnp.concatenate([hidden_BxSxD[:, :1], hidden_BxSxD[:, :-1]], axis=1)
    if logits_from:
      hidden_BxSxD = hidden_BxSxD[:, logits_from:]
    chunked = targets_BxS is not None and cfg.logits_chunk and not self.is_initializing()
    head_logits = functools.partial(_head_logits, dtype=jnp.dtype(cfg.dtype))
    if cfg.tie_embeddings:  # the head is the embedding's transpose
      logits_of = functools.partial(head_logits, kernel_DxV=embedding_VxD.T)
    else:  # the output head (LLaDA names it ff_out too) is never adapted
      head = Dense(cfg.vocab_size, ("embed", "vocab"), cfg, name="ff_out")
      if chunked:  # inside the chunk scan: the head's kernel as a plain array
        logits_of = functools.partial(
          head_logits, kernel_DxV=nn.unbox(head.variables["params"]["kernel"])
        )
      else:
        logits_of = lambda h: nn.with_logical_constraint(  # noqa: E731
          head(h).astype(jnp.float32), ("batch", "length", "vocab")
        )
    if chunked:
      out = _chunked_log_probs(logits_of, hidden_BxSxD, targets_BxS, cfg.logits_chunk)
    elif targets_BxS is not None:
      out = diffusion.token_log_probs(logits_of(hidden_BxSxD), targets_BxS)
    else:
      logits_BxSxV = logits_of(hidden_BxSxD)
      out = (logits_BxSxV, hidden_BxSxD) if return_hidden else logits_BxSxV
    return (out, kv) if return_kv else out


def _head_logits(hidden_BxCxD, kernel_DxV, dtype) -> jax.Array:
  """The output head as `Dense` computes it, on a kernel given as an array (float32 logits)."""
  b, c, d = hidden_BxCxD.shape
  logits = jnp.dot(hidden_BxCxD.reshape(b * c, d).astype(dtype), kernel_DxV.astype(dtype))
  return nn.with_logical_constraint(
    logits.reshape(b, c, -1).astype(jnp.float32), ("batch", "length", "vocab")
  )


def _chunked_log_probs(logits_of, hidden_BxSxD, targets_BxS, chunk: int) -> jax.Array:
  """`log softmax(logits_of(hidden))[target]` over chunks of `chunk` positions (the last one padded)."""
  b, s, d = hidden_BxSxD.shape
  n = -(-s // chunk)
  pad = n * chunk - s
  hidden_NxBxCxD = jnp.pad(hidden_BxSxD, ((0, 0), (0, pad), (0, 0)))
  hidden_NxBxCxD = hidden_NxBxCxD.reshape(b, n, chunk, d).swapaxes(0, 1)
  targets_NxBxC = jnp.pad(targets_BxS, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(carry, xs):
    h_BxCxD, t_BxC = xs
    return carry, diffusion.token_log_probs(logits_of(h_BxCxD), t_BxC)

  _, logp_NxBxC = jax.lax.scan(one, None, (hidden_NxBxCxD, targets_NxBxC))
  return logp_NxBxC.swapaxes(0, 1).reshape(b, n * chunk)[:, :s]


def restack(params, n_layers: int, scan_layers: bool):
  """Parameters in the other layer layout: `blocks` stacked on a leading layer axis (scan_layers) or
  `blocks_0 ... blocks_{L-1}` (unrolled). The values are the same; only the tree differs."""
  params = dict(params)
  if scan_layers and "blocks" not in params:
    layers = [params.pop(f"blocks_{i}") for i in range(n_layers)]
    params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  elif not scan_layers and "blocks" in params:
    stacked = params.pop("blocks")
    for i in range(n_layers):
      params[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def forward_flops(
  cfg: ModelConfig, batch: int, seq_len: int, logits_len: int | None = None
) -> float:
  """Forward FLOPs of one call: 2 x matmul weights per token, attention scores and values, and the
  output head on `logits_len` positions per row (all of them by default). The embedding is a gather."""
  d, f, hd = cfg.d_model, cfg.mlp_hidden, cfg.head_dim
  layer_weights = 2 * d * d + 2 * d * cfg.n_kv_heads * hd + 3 * d * f
  attention = 2 * 2 * seq_len * d  # QK^T and PV per token per layer
  per_token = cfg.n_layers * (2 * layer_weights + attention)
  head = 2 * cfg.vocab_size * d * (seq_len if logits_len is None else logits_len)
  return float(batch) * (seq_len * per_token + head)
