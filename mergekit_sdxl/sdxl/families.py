"""Architecture families a header can be detected as, and which of them this plugin merges.

Pure data, imports nothing: detection (:mod:`mergekit_sdxl.sdxl.detect`) says which family a file
is; preflight, the recipe builder, the loader and the driver ask :data:`MERGEABLE_FAMILIES` whether
it can be merged, and word refusals with :data:`FAMILY_LABELS`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal, Mapping, Tuple

__all__ = [
    "Family",
    "FAMILIES",
    "SDXL_BASE_FAMILY",
    "SDXL_INPAINT_FAMILY",
    "KEY_CHECKED_FAMILIES",
    "MERGEABLE_FAMILIES",
    "FAMILY_LABELS",
    "family_label",
]

Family = Literal["sdxl-base", "sdxl-inpaint", "sdxl-refiner", "sd1", "sd2", "sd3", "flux", "unknown"]
FAMILIES: Tuple[str, ...] = ("sdxl-base", "sdxl-inpaint", "sdxl-refiner", "sd1", "sd2", "sd3", "flux", "unknown")
SDXL_BASE_FAMILY = "sdxl-base"
SDXL_INPAINT_FAMILY = "sdxl-inpaint"

# Families whose keys are compared with the SDXL manifest (for any other family every SDXL key
# would be "missing", which says nothing).
KEY_CHECKED_FAMILIES: Tuple[str, ...] = (SDXL_BASE_FAMILY, SDXL_INPAINT_FAMILY)

# What this plugin merges today: the loader (host/checkpoint.py) reads SDXL base-family files only
# (an inpainting UNet's 9-channel input layer would need its own handling).
MERGEABLE_FAMILIES: Tuple[str, ...] = (SDXL_BASE_FAMILY,)

FAMILY_LABELS: Mapping[str, str] = MappingProxyType(
    {
        "sdxl-base": "SDXL base-family",
        "sdxl-inpaint": "SDXL inpainting",
        "sdxl-refiner": "SDXL refiner",
        "sd1": "SD 1.x",
        "sd2": "SD 2.x",
        "sd3": "SD3",
        "flux": "Flux",
        "unknown": "unknown architecture",
    }
)


def family_label(family: str) -> str:
    """What a user calls a family (``"sd1"`` -> ``"SD 1.x"``); the family itself when unlabelled."""
    return FAMILY_LABELS.get(family, family)
