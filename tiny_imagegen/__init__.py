"""tiny_imagegen: a small, readable FLUX-style text-to-image implementation in MLX.

    from tiny_imagegen.models.mmdit import MMDiT, preset
    from tiny_imagegen.checkpoints.flux import load_flux_transformer
"""

__version__ = "0.1.0"
