"""Student models: a Flax linen T5 whose parameter tree matches t5x checkpoints."""
