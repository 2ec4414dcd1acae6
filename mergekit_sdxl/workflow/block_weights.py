"""SDXL block weights (MBW) as SD users write them, expanded into mergekit's own parameter grammar.

A per-model (or any) parameter may be given as ``{mbw: "1,1,0.5,...,0"}``, ``{mbw: [20 numbers]}`` or
``{mbw: PRESET}``: 20 values in SuperMerger's SDXL order BASE, IN00-IN08, M00, OUT00-OUT08. Before
mergekit sees the config, :func:`expand_block_weights` replaces each such setting by a list of
mergekit ``{filter: ..., value: ...}`` conditions whose filters match exactly the keys of each block
(mergekit tests ``filter in tensor_name``: each filter here is a full key prefix ending in a dot, so
``input_blocks.1.`` never matches ``input_blocks.10``). Every key of the 2515-key SDXL file matches
exactly one filter; no value is interpolated.

Which keys take which value follows SuperMerger's ``blockfromkey`` for SDXL (commit 0b1c491):
``input_blocks.N.`` -> IN0N, ``middle_block.`` -> M00, ``output_blocks.N.`` -> OUT0N, the UNet's final
``out.`` -> OUT08, ``time_embed.`` and ``label_emb.`` -> IN00 (SuperMerger since 2025-11-27; before, it
left them unmerged), both text encoders -> BASE, and the VAE -> BASE (SuperMerger merges
``first_stage_model.`` with the BASE value; here that matters only with ``sdxl.vae.source: merge``).

No mergekit import: this module works on the YAML as loaded (plain dicts and lists).
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.sdxl.manifest import BLOCK_IDS, COMPONENT_PREFIXES
from mergekit_sdxl.workflow.mbw_presets import PRESETS, sdxl_from_sd1

__all__ = [
    "MBW_KEY",
    "MBW_BLOCKS",
    "BLOCK_FILTERS",
    "BlockWeightsError",
    "is_block_weight_setting",
    "block_weight_values",
    "block_weight_filters",
    "block_for_key",
    "expand_block_weights",
]

MBW_KEY = "mbw"

# SuperMerger's SDXL weight order (its BLOCKIDXLL without the trailing VAE entry, which it never
# reads for SDXL keys).
MBW_BLOCKS: Tuple[str, ...] = tuple(block for block in BLOCK_IDS if block != "VAE")
_BLOCK_LIST = "BASE, IN00-IN08, M00, OUT00-OUT08"

_UNET = COMPONENT_PREFIXES["unet"]


def _block_filters() -> Dict[str, Tuple[str, ...]]:
    filters: Dict[str, Tuple[str, ...]] = {
        "BASE": (COMPONENT_PREFIXES["clip_l"], COMPONENT_PREFIXES["clip_g"], COMPONENT_PREFIXES["vae"]),
    }
    for i in range(9):
        filters[f"IN{i:02d}"] = (f"{_UNET}input_blocks.{i}.",)
    filters["IN00"] += (f"{_UNET}time_embed.", f"{_UNET}label_emb.")
    filters["M00"] = (f"{_UNET}middle_block.",)
    for i in range(9):
        filters[f"OUT{i:02d}"] = (f"{_UNET}output_blocks.{i}.",)
    filters["OUT08"] += (f"{_UNET}out.",)
    return {block: filters[block] for block in MBW_BLOCKS}


# The mergekit filters of each block (substrings of the full tensor name).
BLOCK_FILTERS: Mapping[str, Tuple[str, ...]] = _block_filters()


class BlockWeightsError(UsageError):
    """A ``{mbw: ...}`` setting that cannot be read; the message names the config, entry and parameter."""


def is_block_weight_setting(setting: Any) -> bool:
    """True for a parameter setting written as ``{mbw: ...}``."""
    return isinstance(setting, dict) and MBW_KEY in setting


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    for kind, name in ((str, "string"), (list, "list"), (dict, "mapping")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _preset(name: str) -> Tuple[float, ...]:
    if name in PRESETS:
        return PRESETS[name]
    try:
        float(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"{name!r} is one number, not 20 block weights (write the number without mbw:, or 20 values)")
    folded = {preset.upper(): preset for preset in PRESETS}
    close = [folded[name.upper()]] if name.upper() in folded else difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.6)
    hint = " (did you mean " + " or ".join(repr(c) for c in close) + "?)" if close else " (see docs/methods.md for the presets)"
    raise ValueError(f"unknown block-weight preset {name!r}{hint}")


def _number(item: Any, position: int) -> float:
    if isinstance(item, bool) or not isinstance(item, (int, float, str)):
        raise ValueError(f"value {position + 1} is a {_kind(item)}, not a number")
    try:
        value = float(item)
    except ValueError:
        raise ValueError(f"value {position + 1} ({str(item).strip()!r}) is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"value {position + 1} ({item!r}) must be a finite number")
    return value


def _count_problem(values: Sequence[float]) -> str:
    count = len(values)
    text = f"{count} values; SDXL block weights take 20 ({_BLOCK_LIST})"
    if count == 26:
        converted = ",".join(f"{v:g}" for v in sdxl_from_sd1(values))
        return text + f". 26 is SuperMerger's SD 1.x layout; for SDXL it drops IN09-IN11 and OUT09-OUT11: mbw: \"{converted}\""
    if count == 21:
        return text + "; the VAE is not one of them (it follows BASE when sdxl.vae.source is merge)"
    return text


def block_weight_values(mbw: Any) -> Tuple[float, ...]:
    """The 20 block weights of an ``mbw:`` value: a comma-separated string, a list of numbers or a
    preset name. Raises ValueError with the problem (no location)."""
    if isinstance(mbw, str):
        if "," not in mbw:  # as SuperMerger reads it: no comma -> a preset name
            return _preset(mbw.strip())
        items: List[Any] = mbw.split(",")
        if any(not item.strip() for item in items):
            raise ValueError(f"an empty value in {mbw!r}")
    elif isinstance(mbw, list):
        items = list(mbw)
        if any(isinstance(item, str) for item in items):  # a YAML list takes numbers, not quoted text
            first = next(i for i, item in enumerate(items) if isinstance(item, str))
            raise ValueError(f"value {first + 1} is a string ({items[first]!r}), not a number")
    else:
        raise ValueError(f"expected 20 comma-separated numbers, a list of 20 numbers or a preset name, got a {_kind(mbw)}")
    values = tuple(_number(item, i) for i, item in enumerate(items))
    if len(values) != len(MBW_BLOCKS):
        raise ValueError(_count_problem(values))
    return values


def block_weight_filters(values: Sequence[float]) -> List[Dict[str, Any]]:
    """mergekit's ``[{filter, value}, ...]`` for 20 block weights in :data:`MBW_BLOCKS` order."""
    if len(values) != len(MBW_BLOCKS):
        raise ValueError(_count_problem(values))
    return [
        {"filter": flt, "value": float(value)}
        for block, value in zip(MBW_BLOCKS, values, strict=True)
        for flt in BLOCK_FILTERS[block]
    ]


def block_for_key(key: str) -> Optional[str]:
    """The block whose value a key takes, as mergekit resolves the expanded filters (the first
    filter that is a substring of the name); None for a name no filter matches."""
    for block in MBW_BLOCKS:
        if any(flt in key for flt in BLOCK_FILTERS[block]):
            return block
    return None


def _file_name(entry: Mapping[str, Any]) -> str:
    """`` (a.safetensors)`` for a ``{model: ...}`` entry, for messages; "" when it does not read."""
    ref = entry.get("model")
    if isinstance(ref, dict):
        ref = ref.get("model", ref.get("path"))
        if isinstance(ref, dict):
            ref = ref.get("path")
    if not isinstance(ref, str):
        return ""
    path = ref.split("+")[0].split("@")[0]
    return f" ({path.rsplit('/', 1)[-1] or path})"


Scope = Tuple[Tuple[Any, ...], str, Dict[str, Any]]


def _entry_scopes(items: Any, path: Tuple[Any, ...], where: str) -> Iterator[Scope]:
    if not isinstance(items, list):
        return
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("parameters"), dict):
            yield path + (i, "parameters"), f"{where}[{i}]{_file_name(item)}: ", item["parameters"]


def _slice_scopes(slices: Any, path: Tuple[Any, ...], where: str) -> Iterator[Scope]:
    if not isinstance(slices, list):
        return
    for s, item in enumerate(slices):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("parameters"), dict):
            yield path + (s, "parameters"), f"{where}[{s}]: ", item["parameters"]
        yield from _entry_scopes(item.get("sources"), path + (s, "sources"), f"{where}[{s}].sources")


def _scopes(raw: Dict[str, Any]) -> Iterator[Scope]:
    """Every ``parameters:`` mapping of a config, with its path and the label messages use."""
    if isinstance(raw.get("parameters"), dict):
        yield ("parameters",), "", raw["parameters"]
    yield from _entry_scopes(raw.get("models"), ("models",), "models")
    yield from _slice_scopes(raw.get("slices"), ("slices",), "slices")
    modules = raw.get("modules")
    for name, module in (modules.items() if isinstance(modules, dict) else ()):
        if not isinstance(module, dict):
            continue
        at: Tuple[Any, ...] = ("modules", name)
        if isinstance(module.get("parameters"), dict):
            yield at + ("parameters",), f"modules.{name}: ", module["parameters"]
        yield from _entry_scopes(module.get("models"), at + ("models",), f"modules.{name}.models")
        yield from _slice_scopes(module.get("slices"), at + ("slices",), f"modules.{name}.slices")
    sdxl = raw.get("sdxl")
    components = sdxl.get("components") if isinstance(sdxl, dict) else None
    for name, section in (components.items() if isinstance(components, dict) else ()):
        if not isinstance(section, dict):
            continue
        at = ("sdxl", "components", name)
        if isinstance(section.get("parameters"), dict):
            yield at + ("parameters",), f"sdxl.components.{name}: ", section["parameters"]
        yield from _entry_scopes(section.get("models"), at + ("models",), f"sdxl.components.{name}.models")


Locate = Callable[[Sequence[Any]], Optional[str]]


def expand_block_weights(raw: Dict[str, Any], *, source: str, locate: Optional[Locate] = None) -> Dict[str, Any]:
    """A copy of the config ``raw`` with every ``{mbw: ...}`` setting replaced by its filter list.

    ``source`` names the config in messages; ``locate(path)`` may give "line L, column C" of the
    value at a path of keys and indices. A config without block weights comes back unchanged
    (the same object). Raises :class:`BlockWeightsError`.
    """
    found = [
        (path, label, name, params[name])
        for path, label, params in _scopes(raw)
        for name in params
        if is_block_weight_setting(params[name])
    ]
    if not found:
        return raw
    out = copy.deepcopy(raw)
    by_path = {scope_path: params for scope_path, _, params in _scopes(out)}
    for path, label, name, setting in found:
        extra = [str(key) for key in setting if key != MBW_KEY]
        try:
            if extra:
                raise ValueError(f"a block-weight setting takes only {MBW_KEY}:, not {', '.join(repr(k) for k in extra)}")
            filters = block_weight_filters(block_weight_values(setting[MBW_KEY]))
        except ValueError as error:
            where = locate(path + (name,)) if locate is not None else None
            at = f" ({where})" if where else ""
            raise BlockWeightsError(f"config {source}: {label}parameter {name!r}: {MBW_KEY}: {error}{at}") from None
        by_path[path][name] = filters
    return out
