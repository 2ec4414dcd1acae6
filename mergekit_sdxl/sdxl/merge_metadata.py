"""The ``__metadata__`` vocabulary of merged checkpoints: key names, and how to read them back.

Pure format facts (no file access, no torch): the key names this plugin writes (io/provenance.py
writes them), A1111/SuperMerger's recipe keys, the modelspec prefix, and :func:`read_provenance`,
which parses a header's metadata dict. It lives in the sdxl layer so that detection can report a
file's recipe without importing io.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional

__all__ = [
    "META_RECIPE",
    "META_VERSION",
    "META_MERGEKIT_VERSION",
    "META_INPUTS",
    "META_METHOD",
    "META_METHOD_VERSION",
    "META_SEED",
    "META_DTYPE",
    "META_OUT_DTYPE",
    "A1111_RECIPE",
    "A1111_MODELS",
    "MODELSPEC_PREFIX",
    "MODELSPEC_PREDICTION_TYPE",
    "PREDICTION_TYPES",
    "normalise_prediction_type",
    "read_provenance",
]

# Ours (every value a string).
META_RECIPE = "mergekit_sdxl.recipe"
META_VERSION = "mergekit_sdxl.version"
META_MERGEKIT_VERSION = "mergekit.version"
META_INPUTS = "mergekit_sdxl.inputs"
META_METHOD = "mergekit_sdxl.method"
# JSON {method: version} of every method the merge used (mergekit_sdxl/method_versions.py).
META_METHOD_VERSION = "mergekit_sdxl.method_version"
META_SEED = "mergekit_sdxl.seed"
META_DTYPE = "mergekit_sdxl.dtype"
META_OUT_DTYPE = "mergekit_sdxl.out_dtype"

# A1111 / SuperMerger's (JSON strings).
A1111_RECIPE = "sd_merge_recipe"
A1111_MODELS = "sd_merge_models"

# Stability AI model spec.
MODELSPEC_PREFIX = "modelspec."
MODELSPEC_PREDICTION_TYPE = MODELSPEC_PREFIX + "prediction_type"

# Spellings of a prediction type seen in metadata -> modelspec's ("epsilon" | "v").
PREDICTION_TYPES: Mapping[str, str] = MappingProxyType(
    {"epsilon": "epsilon", "eps": "epsilon", "v": "v", "v_prediction": "v", "v-prediction": "v"}
)


def normalise_prediction_type(value: object) -> Optional[str]:
    """``"epsilon"`` or ``"v"`` for any spelling in :data:`PREDICTION_TYPES` (case and surrounding
    blanks ignored), else None."""
    return PREDICTION_TYPES.get(str(value).strip().lower())


def _json(s: Optional[str]) -> Any:
    """Parsed JSON, or the raw string when it does not parse (a hostile file's deep nesting too)."""
    if s is None:
        return None
    try:
        return json.loads(s)
    except (TypeError, ValueError, RecursionError):
        return s


def read_provenance(metadata: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """What a file's ``__metadata__`` says about how it was merged, or None.

    Ours (``mergekit_sdxl.recipe``) first: ``{"tool": "mergekit-sdxl", "version", "mergekit_version",
    "method", "method_version" ({method: version}, None in files written before it), "seed", "dtype", "out_dtype", "recipe" (YAML text), "inputs" (list of dicts),
    "modelspec" (dict)}``; else A1111/SuperMerger's ``sd_merge_recipe``: ``{"tool": "a1111",
    "recipe" (parsed JSON), "inputs": [{"name", "sha256", "legacy_hash"}]}``. Malformed JSON values
    are kept as their raw strings.
    """
    if not metadata:
        return None
    modelspec = {k[len(MODELSPEC_PREFIX):]: v for k, v in metadata.items() if k.startswith(MODELSPEC_PREFIX)}
    if META_RECIPE in metadata:
        inputs = _json(metadata.get(META_INPUTS))
        return {
            "tool": "mergekit-sdxl",
            "version": metadata.get(META_VERSION),
            "mergekit_version": metadata.get(META_MERGEKIT_VERSION),
            "method": metadata.get(META_METHOD),
            "method_version": _json(metadata.get(META_METHOD_VERSION)),
            "seed": metadata.get(META_SEED),
            "dtype": metadata.get(META_DTYPE),
            "out_dtype": metadata.get(META_OUT_DTYPE),
            "recipe": metadata[META_RECIPE],
            "inputs": inputs if isinstance(inputs, list) else [],
            "modelspec": modelspec,
        }
    if A1111_RECIPE in metadata:
        models = _json(metadata.get(A1111_MODELS))
        inputs = []
        if isinstance(models, dict):
            for sha, info in models.items():
                info = info if isinstance(info, dict) else {}
                inputs.append({"name": info.get("name"), "sha256": sha, "legacy_hash": info.get("legacy_hash")})
        return {"tool": "a1111", "recipe": _json(metadata[A1111_RECIPE]), "inputs": inputs, "modelspec": modelspec}
    return None
