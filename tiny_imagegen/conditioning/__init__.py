"""Prompt -> conditioning: tokenizers (text/) and text encoders (models/, loaded by checkpoints/)
put together as each family's reference pipeline does it: T5 + CLIP (FLUX.1, SD 1.5, tiny-shapes;
t5_clip.py) and Qwen3's chat-template hidden states (Z-Image, FLUX.2 klein; qwen.py)."""
