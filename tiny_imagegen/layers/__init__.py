"""Building blocks with no model of their own: RoPE, position ids, embeddings, attention, adaLN."""
