"""FLUX.1 Kontext [dev]: FLUX.1 that edits from a reference image (diffusers' FluxKontextPipeline).

The same FLUX.1 transformer (pipelines/flux1.py, 19 double + 38 single blocks, guidance-distilled);
what Kontext adds is one more image on the sequence, told apart by its position ids alone:

- the reference is resized (LANCZOS) to the trained resolution of the nearest aspect ratio
  (editing/images.py KONTEXT_RESOLUTIONS, `auto_resize=False` keeps its own size floored to 16),
  encoded to the VAE posterior's mode, (z - shift) · scale, packed in 2x2 patches like the latents;
- its tokens follow the noisy ones with ids (1, row, col): the first id axis, 0 for the image being
  made, is 1 for the reference (KX:663); the same every step; the output keeps the noisy tokens;
- the schedule's shift counts the noisy tokens only (KX:966).

Without a reference it draws from the prompt alone, as FLUX.1-dev (as FluxKontextPipeline does).
Size: without --width/--height the output takes the reference's (resized) size. Given sizes are
used as they are; diffusers would rescale them to about max_area = 1024² pixels (KX:846-851).
"""

from ..editing.images import kontext_reference, open_image
from ..layers.embeddings import pack_latents
from ..layers.positions import flux_image_ids
from ..models.pixels import from_pil
from .flux1 import Flux1Pipeline

REFERENCE_INDEX = 1  # the reference's value on the first id axis


class FluxKontextPipeline(Flux1Pipeline):
    family = "flux1-kontext"
    img2img = False  # FluxKontextPipeline takes its image as a reference, never noised
    inpaint = False  # FluxKontextInpaintPipeline is not here
    max_references = 1
    auto_resize = True  # the trained resolutions (FluxKontextPipeline's _auto_resize)

    def output_size(self, width, height, image=None, references=None):
        if references and (width is None or height is None):
            w, h = kontext_reference(open_image(references[0], "reference"), self.size_multiple, self.auto_resize).size
            return width or w, height or h
        return super().output_size(width, height, image, references)

    def encode_references(self, references, width, height):
        """The reference -> (tokens (1, N_ref, 4C), ids (N_ref, 3)) at (1, row, col)."""
        image = kontext_reference(open_image(references[0], "reference"), self.size_multiple, self.auto_resize)
        z = self.vae.to_latents(self.vae.encode(from_pil(image).astype(self.dtype)).mode())  # argmax, KX:607-609
        _, h, w, _ = z.shape
        return pack_latents(z), flux_image_ids(h // 2, w // 2, index=REFERENCE_INDEX)
