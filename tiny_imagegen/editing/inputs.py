"""What a pipeline takes besides the prompt, and how it reads it: the init image (--image), the
mask (--mask), the reference images (--ref). `Pipeline` (pipeline.py) inherits this; a family
says what it takes with three class attributes, and overrides the readers where its reference
pipeline reads differently (FLUX.2 klein: references and a bilinear mask; Kontext: resized
references). `refusal` needs no weights: the command asks the class before loading anything.
"""

import mlx.core as mx


class EditingInputs:
    # what a family takes besides the prompt (the command refuses the rest before loading a model)
    img2img = True  # `generate(image=..., strength=...)`: start from an init image
    inpaint = False  # `generate(image=..., mask=...)`: repaint where the mask is white
    max_references = 0  # `generate(references=[...])`: reference images for editing
    # the init image's latents: "mode" of the VAE posterior, or a "sample" of it (diffusers'
    # sample_mode="sample": mean + std·ε with ε drawn per image, before the noise)
    init_posterior = "mode"

    def output_size(self, width: int | None, height: int | None, image=None, references=None) -> tuple[int, int]:
        """The size generate makes: as asked; else the init image's (floored to the size
        multiple); else the family's default. Families with references may say otherwise."""
        if image is not None and (width is None or height is None):
            from .images import image_size, open_image

            w, h = image_size(open_image(image, "init image"), self.size_multiple)
            return width or w, height or h
        return width or self.defaults.width, height or self.defaults.height

    def encode_image(self, image, width: int, height: int):
        """An init image -> the VAE's posterior q(z | x) (models/vae.py DiagonalGaussian), the
        image LANCZOS-resized to (width, height) first (VaeImageProcessor.preprocess)."""
        from ..models.pixels import from_pil
        from .images import open_image, resize_init

        image = resize_init(open_image(image, "init image"), width, height)
        return self.vae.encode(from_pil(image).astype(self.dtype))

    def init_latents(self, q, eps: mx.array | None) -> mx.array:
        """The diffusion-space latents of the init image: the posterior's mode, or mean + std·ε
        (one row per ε), then the VAE's scale and shift; float32 (B, ...) like the noise."""
        z = q.mode() if eps is None else q.mean + q.std * eps.astype(q.mean.dtype)
        return self.vae.to_latents(z).astype(mx.float32)

    def read_mask(self, mask, image, width: int, height: int) -> mx.array:
        """A mask (PIL image or path, white = repaint) drawn on the init image `image`, checked
        (its size is the image's; black and white) -> the family's latent mask."""
        from .images import open_image
        from .masks import check_mask

        mask, init_image = open_image(mask, "mask"), open_image(image, "init image")
        if mask.size != init_image.size:
            raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image {init_image.size[0]}x"
                             f"{init_image.size[1]}: draw the mask on the image, at its size")
        check_mask(mask)
        return self.latent_mask(mask, width, height)

    def latent_mask(self, mask, width: int, height: int) -> mx.array:
        """The mask on the latent grid (1, h, w, 1), 1 = repaint: nearest (FI:708, SD, Z-Image)."""
        from . import masks

        f = self.vae.config.downscale
        m = masks.nearest(masks.pixel_mask(mask, width, height), height // f, width // f)
        return mx.array(m)[None, :, :, None]

    def encode_references(self, references: list, width: int, height: int):
        """Reference images -> what the family's sampler reads beside the noisy tokens."""
        raise NotImplementedError(f"{self.family} models take no reference images")

    def check_editing(self, image, mask, references) -> None:
        """What this family cannot do with these inputs, as one-line errors (the command asks the
        class before loading: `refusal`)."""
        problem = self.refusal(image is not None, mask is not None, len(references or []), self.name)
        if problem:
            raise ValueError(problem)

    @classmethod
    def refusal(cls, image: bool, mask: bool, references: int, model: str = "") -> str | None:
        """Why this family refuses these inputs (None: it takes them); needs no weights."""
        name = f"{model} ({cls.family} models)" if model else f"{cls.family} models"
        if mask and not image:
            return "--mask needs --image: the image to inpaint"
        if mask and not cls.inpaint:
            return f"--mask: {name} has no inpainting here"
        if image and not mask and not cls.img2img:
            can = (["it inpaints (add --mask)"] if cls.inpaint else []) + (
                ["edits from reference images (--ref)"] if cls.max_references else [])
            hint = f"; {' and '.join(can)}" if can else ""
            return f"--image: {name} has no image-to-image here{hint}"
        if references and not cls.max_references:
            return f"--ref: {name} takes no reference images (--image is an init image for image-to-image)"
        if references > cls.max_references:
            return f"--ref given {references} times: {name} takes at most {cls.max_references} reference image(s)"
        return None

    def posterior_noise(self, seed: int, shape: tuple[int, ...]) -> mx.array:
        """The ε that samples the init image's VAE posterior for one image: from its seed alone,
        a stream apart from the noise's."""
        key = mx.random.split(mx.random.key(seed))[1]
        return mx.random.normal((1, *shape[1:]), dtype=mx.float32, key=key)
