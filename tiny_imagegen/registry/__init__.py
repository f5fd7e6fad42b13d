"""Where a model comes from: the registry of published models (catalog.py), the hub cache (hub.py),
which folder a `--model` names (where.py), and how large it is (sizes.py).

    from tiny_imagegen import registry
    registry.find("schnell")            # the catalog's entries, re-exported here
    registry.where.locate("schnell")    # -> (folder, spec): shipped, converted, cached or downloaded
"""

from .catalog import FAMILIES, MODELS, Family, ModelSpec, SamplingDefaults, by_repo, family_for_pipeline_class, find, names

__all__ = ["FAMILIES", "MODELS", "Family", "ModelSpec", "SamplingDefaults", "by_repo", "family_for_pipeline_class",
           "find", "names"]
