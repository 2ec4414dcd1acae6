"""The ``sdxl:`` section of a merge config and the memory budget.

mergekit ignores unknown top-level YAML keys, so the section is invisible to the
stock ``mergekit-yaml`` (which then uses these defaults) and read by
``mergekit-sdxl merge``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Literal, Optional, Tuple, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from mergekit_sdxl.method_versions import check_method_versions

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


# The components a ``sdxl.components`` section may set (the VAE has ``sdxl.vae``).
Component = Literal["unet", "clip_l", "clip_g"]
COMPONENT_OVERRIDES: Tuple[str, ...] = get_args(Component)


class ComponentModel(BaseModel):
    """One model of a component's own merge: an input of the config, with parameters for this merge."""

    model_config = ConfigDict(extra="forbid")

    model: Any = Field(description="The model as written under the config's models: (a path or {model: {path: ...}}).")
    parameters: Optional[Dict[str, Any]] = None


class ComponentOptions(BaseModel):
    """How one SDXL component is merged when it differs from the rest of the config.

    Either ``source`` (the component copied unmerged from ``base`` or from one input model, given by
    its path as written under ``models:``), or a merge of its own: ``merge_method`` (default: the
    config's), ``parameters`` (replacing the top-level ``parameters:`` for this component) and
    ``models`` (which inputs, with their per-model parameters; default: all of the config's models,
    with no per-model parameters). The base model, dtype and out_dtype are the config's.
    """

    model_config = ConfigDict(extra="forbid")

    source: Optional[str] = None
    merge_method: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    models: Optional[List[ComponentModel]] = None

    @model_validator(mode="after")
    def _source_or_merge(self) -> ComponentOptions:
        merge = [name for name in ("merge_method", "parameters", "models") if getattr(self, name) is not None]
        if self.source is not None and merge:
            raise ValueError(f"source: copies the component unmerged; it cannot be combined with {', '.join(merge)}:")
        if self.source is None and not merge:
            raise ValueError("give source: (copy from base or one model) or merge_method:/parameters:/models: (merge it)")
        if self.source is not None and not self.source.strip():
            raise ValueError("source: must be 'base' or the path of one of the models")
        return self


class SDXLOptions(BaseModel):
    """SDXL-specific settings: the ``sdxl:`` section of a config, and CLI flags."""

    model_config = ConfigDict(extra="forbid")

    vae: VAEOptions = VAEOptions()
    memory_budget: Optional[Union[int, str]] = None
    allow_vpred_mix: bool = False
    components: Dict[Component, ComponentOptions] = Field(
        default_factory=dict,
        description="Per-component merges (unet, clip_l, clip_g) that differ from the config's merge_method/parameters.",
    )
    method_version: Dict[str, Union[StrictInt, StrictStr]] = Field(
        default_factory=dict,
        description="Pinned meaning of each method, e.g. {tgmd: 2} (mergekit_sdxl/method_versions.py); "
        "a version this installation does not implement is refused.",
    )

    @field_validator("memory_budget")
    @classmethod
    def _check_budget(cls, value):
        if value is not None:
            parse_bytes(value)
        return value

    @field_validator("method_version")
    @classmethod
    def _check_method_version(cls, value):
        check_method_versions(value)
        return value

    def methods_used(self, top_level: str) -> Tuple[str, ...]:
        """The merge methods of a config with this section: ``top_level`` first, then each merged
        component's own method, each once (a component copied with ``source:`` uses none)."""
        methods = [top_level] + [c.merge_method or top_level for c in self.components.values() if c.source is None]
        return tuple(dict.fromkeys(methods))

    @property
    def memory_budget_bytes(self) -> int:
        if self.memory_budget is None:
            return default_memory_budget()
        return parse_bytes(self.memory_budget)
