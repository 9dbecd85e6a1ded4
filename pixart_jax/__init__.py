"""pixart_jax: PixArt-Sigma in JAX / Flax NNX."""
