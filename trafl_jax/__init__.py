"""trafl_jax: TraFL post-training of masked diffusion language models in JAX."""
