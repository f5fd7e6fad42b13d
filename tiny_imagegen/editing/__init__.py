"""Editing: reference images (FLUX.2 klein, FLUX.1 Kontext), image-to-image and inpainting.

- images.py          reading input images and the reference pipelines' resizing rules
- masks.py           an inpainting mask: greyscale, binarised, then onto the latent grid
- masked_sampling.py the known region: after every step, the unmasked latents are replaced by the
                     init image's latents noised to the next step's level (one mechanism for every
                     family; the family supplies its noise level and how to noise)
"""
