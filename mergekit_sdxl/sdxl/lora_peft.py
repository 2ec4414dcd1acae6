"""The LoRA scale of diffusers / PEFT files, from their ``lora_adapter_metadata``. Pure: metadata only.

diffusers' ``save_lora_weights`` stores each component's PEFT ``LoraConfig`` as JSON under the
safetensors metadata key ``lora_adapter_metadata``, flattened with the component as prefix
(``{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, "text_encoder.r": ...}``);
a PEFT adapter saved from one model (``save_lora_adapter``) stores the config unprefixed. When
such metadata is present, diffusers and PEFT scale a module by ``lora_alpha / r`` (``/ sqrt(r)``
with ``use_rslora``), the alpha taken from ``alpha_pattern`` where a pattern matches the module
(PEFT's ``get_pattern_key``: ``(.*\\.)?(pattern)$`` on the module's name inside its component),
else ``lora_alpha``. Without metadata (and without kohya ``.alpha`` tensors) the scale is 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["PEFT_METADATA_KEY", "PeftAlpha", "PeftMetadataError", "peft_configs", "peft_alpha"]

PEFT_METADATA_KEY = "lora_adapter_metadata"
_COMPONENTS: Tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
_WHOLE = ""  # the config of an adapter saved from one model (no component prefix)


class PeftMetadataError(ValueError):
    """``lora_adapter_metadata`` that is not the JSON object diffusers writes."""


@dataclass(frozen=True)
class PeftAlpha:
    """A module's alpha under its PEFT config; ``rslora``: the rank is divided as ``sqrt(r)``."""

    alpha: float
    rslora: bool = False


def peft_configs(metadata: Mapping[str, str]) -> Dict[str, Dict[str, Any]]:
    """Component (``unet``, ``text_encoder``, ``text_encoder_2``; ``""`` for an unprefixed config)
    -> its PEFT config entries; empty when the file has no ``lora_adapter_metadata``."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as error:
        raise PeftMetadataError(f"{PEFT_METADATA_KEY} is not JSON ({error})") from None
    if not isinstance(flat, dict):
        raise PeftMetadataError(f"{PEFT_METADATA_KEY} is not a JSON object")
    out: Dict[str, Dict[str, Any]] = {}
    for key, value in flat.items():
        component, dot, field = str(key).partition(".")
        if dot and component in _COMPONENTS:
            out.setdefault(component, {})[field] = value
        else:
            out.setdefault(_WHOLE, {})[str(key)] = value
    return out


def _split(module: str) -> Tuple[str, str]:
    """(component, name inside it) of a normalised diffusers / PEFT module name."""
    for component in sorted(_COMPONENTS, key=len, reverse=True):
        if module.startswith(component + "."):
            return component, module[len(component) + 1 :]
    return _WHOLE, module


def _number(config: Mapping[str, Any], field: str) -> Optional[float]:
    value = config.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PeftMetadataError(f"{PEFT_METADATA_KEY}: {field} is {value!r}, not a number")
    return float(value)


def _pattern_alpha(patterns: Any, names: Tuple[str, ...]) -> Optional[float]:
    if not isinstance(patterns, dict):
        return None
    for pattern, value in patterns.items():  # the first matching pattern, as PEFT takes it
        try:
            matched = any(re.match(rf"(.*\.)?({pattern})$", name) for name in names)
        except re.error:
            matched = False
        if matched and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def peft_alpha(configs: Mapping[str, Mapping[str, Any]], module: str) -> Optional[PeftAlpha]:
    """The PEFT alpha of ``module`` (a diffusers / PEFT name such as ``unet.down_blocks.1...``),
    None when no config covers its component or the config gives no ``lora_alpha``."""
    component, name = _split(module)
    config = configs.get(component)
    if config is None and component != _WHOLE:
        config = configs.get(_WHOLE)
    if config is None:
        return None
    names: Tuple[str, ...] = (name,)
    if component.startswith("text_encoder") and not name.startswith("text_model."):
        names += ("text_model." + name,)  # transformers 5's CLIP has no text_model level
    alpha = _pattern_alpha(config.get("alpha_pattern"), names)
    if alpha is None:
        alpha = _number(config, "lora_alpha")
    if alpha is None:
        return None
    return PeftAlpha(alpha=alpha, rslora=bool(config.get("use_rslora", False)))
