"""`tiny-imagegen models` (or `generate --model list`): the registry as a table, with licence,
size on disk per dtype / quantization, and whether the weights are already here."""

from .. import registry
from ..checkpoints.convert import read_manifest
from ..registry.where import shipped
from ..registry.sizes import model_bytes


def availability(spec: registry.ModelSpec) -> str:
    """"shipped", "cached" (complete in the Hugging Face cache), or "not downloaded"."""
    from ..registry.hub import ModelNotAvailable, resolve_model

    if shipped(spec.name) is not None:
        return "shipped" if spec.shipped else "converted in weights/"
    try:
        resolve_model(spec.name, local_files_only=True)
        return "cached"
    except ModelNotAvailable as e:
        return "incomplete in cache" if "incomplete" in str(e) else "not downloaded"


def print_models() -> None:
    print("| model | family | licence | bf16 | 8-bit | 4-bit | here | aliases |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in registry.MODELS:
        sizes = model_bytes(spec)
        cells = [f"{sum(sizes[s].values()) / 1e9:.1f} GB" if sizes else "-" for s in ("bf16", "8-bit", "4-bit")]
        if spec.shipped and shipped(spec.name):
            files = read_manifest(shipped(spec.name))["files"].values()
            cells[0] = f"{sum(f['size'] for f in files) / 1e6:.1f} MB (fp32, as shipped)"
        licence = spec.licence + (" (gated)" if spec.gated else "")
        print(f"| {spec.name} | {spec.family} | {licence} | {' | '.join(cells)} | {availability(spec)} | "
              f"{', '.join(spec.aliases) or '-'} |")
    print("\nsizes: every component (transformer, text encoders, VAE) as our converted files store them; "
          "quantized settings keep embeddings, norms, boundary layers and the VAE in bf16")


def main(argv=None) -> int:
    import argparse

    argparse.ArgumentParser(description="List the registered models.").parse_args(argv)
    print_models()
    return 0
