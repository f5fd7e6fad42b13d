"""The models: MM-DiT (FLUX / SD3-style), text encoders, VAE."""
