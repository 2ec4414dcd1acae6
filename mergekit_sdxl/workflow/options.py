"""The ``sdxl:`` section of a merge config and the memory budget.

mergekit ignores unknown top-level YAML keys, so the section is invisible to the
stock ``mergekit-yaml`` (which then uses these defaults) and read by
``mergekit-sdxl merge``.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3, "T": 1024**4, "TB": 1024**4}
_KIB = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


MIN_BUDGET = 16 * 1024**2


def parse_bytes(value: Union[str, int]) -> int:
    """``"4GB"``, ``"512MiB"``, ``"64M"`` or an int -> bytes (binary units), at least 16 MiB."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if not MIN_BUDGET <= value < 2**63:
            raise ValueError(f"{value!r}: a memory budget must be at least 16MB")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if not match or (unit not in _UNITS and unit not in _KIB):
        raise ValueError(f"not a size: {value!r} (use e.g. 4GB, 512MB, 64MiB)")
    size = float(match.group(1)) * (_UNITS.get(unit) or _KIB[unit])
    if not MIN_BUDGET <= size < 2**63:
        raise ValueError(f"{value!r}: a memory budget must be at least 16MB")
    return int(size)


def default_memory_budget() -> int:
    """Half the available RAM, capped to 8 GiB and at least 512 MiB."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        available = 8 * 1024**3
    return int(max(512 * 1024**2, min(8 * 1024**3, available // 2)))


class VAEOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        default="base",
        description="'base' (default: the base model's VAE), 'merge' (merge it like the rest) or a checkpoint path.",
    )


class SDXLOptions(BaseModel):
    """SDXL-specific settings: the ``sdxl:`` section of a config, and CLI flags."""

    model_config = ConfigDict(extra="forbid")

    vae: VAEOptions = VAEOptions()
    memory_budget: Optional[Union[int, str]] = None
    allow_vpred_mix: bool = False

    @field_validator("memory_budget")
    @classmethod
    def _check_budget(cls, value):
        if value is not None:
            parse_bytes(value)
        return value

    @property
    def memory_budget_bytes(self) -> int:
        if self.memory_budget is None:
            return default_memory_budget()
        return parse_bytes(self.memory_budget)
