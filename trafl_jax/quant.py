"""The frozen base's quantized layer kernels under adapters (`lora.base_dtype`).

- `int8`: symmetric, per output channel: `kernel_q` int8 `[I, O]`, `kernel_scale` float32 `[O]` (max |W|
  over the input / 127).
- `nf4`: QLoRA's 4-bit NormalFloat, per block of `NF4_BLOCK` inputs of one output channel: each weight is
  the nearest of 16 normal quantiles (`NF4`) times the block's absolute maximum. Two codes share a byte
  (`kernel_q` uint8 `[I/2, O]`: input 2i in the low nibble, 2i+1 in the high one), `kernel_scale` float32
  `[I/block, O]`. The scales are not quantized again (QLoRA's double quantization): 0.5 bit a weight
  more, 4.5 in all.

Both keep the kernel's `[..., I, O]` layout (leading axes are the scanned layers): `kernel_q` is sharded
as the kernel, `kernel_scale` along the output channels only (an nf4 block axis, I/64, can be shorter than
the mesh axis the input is sharded on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# QLoRA's NF4 code book (Dettmers et al. 2023, appendix E; bitsandbytes' values): quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero.
NF4 = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)
NF4_BLOCK = 64


def nf4_block(width: int) -> int:
  """The block of inputs one scale covers: `NF4_BLOCK`, or the whole input of a narrower kernel."""
  block = min(NF4_BLOCK, width)
  if width % 2 or width % block:
    raise ValueError(f"an nf4 kernel's input width {width} must be even and a multiple of {block}")
  return block


def quant_shapes(kind: str, width: int, features: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """`kernel_q` and `kernel_scale` shapes and dtypes of one `[width, features]` kernel."""
  if kind == "int8":
    return {"kernel_q": ((width, features), "int8"), "kernel_scale": ((features,), "float32")}
  block = nf4_block(width)
  return {
    "kernel_q": ((width // 2, features), "uint8"),
    "kernel_scale": ((width // block, features), "float32"),
  }


def quantize(kind: str, w_IxO: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(kernel_q, kernel_scale)` of a kernel `[..., I, O]`. Jittable."""
  w = w_IxO.astype(jnp.float32)
  if kind == "int8":
    scale_O = jnp.maximum(jnp.max(jnp.abs(w), axis=-2), 1e-12) / 127.0
    return jnp.round(w / scale_O[..., None, :]).astype(jnp.int8), scale_O
  *lead, width, features = w.shape
  block = nf4_block(width)
  blocks = w.reshape(*lead, width // block, block, features)
  scale_BxO = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-2), 1e-12)
  normed = (blocks / scale_BxO[..., None, :]).reshape(*lead, width, features)
  codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4)), axis=-1).astype(jnp.uint8)
  packed = codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)
  return packed, scale_BxO


def dequantize(kind: str, q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """The kernel `[..., I, O]` in `dtype` from `quantize`'s pair."""
  if kind == "int8":
    return q.astype(dtype) * scale.astype(dtype)[..., None, :]
  *lead, half, features = q.shape
  # Each nibble looked up in `dtype` from the uint8 codes directly (no wider index array).
  table = jnp.asarray(NF4, dtype)
  values = jnp.stack([jnp.take(table, q & 0xF, axis=0), jnp.take(table, q >> 4, axis=0)], axis=-2)
  values = values.reshape(*lead, 2 * half, features)
  n_blocks = scale.shape[-2]
  values = values.reshape(*lead, n_blocks, 2 * half // n_blocks, features)
  return (values * scale.astype(dtype)[..., None, :]).reshape(*lead, 2 * half, features)
