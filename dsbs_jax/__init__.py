"""dsbs-jax: Distilling Step-by-Step (Hsieh et al., 2023) in JAX/Flax."""
