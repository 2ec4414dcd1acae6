"""What each merge method means, by version: the one table every output and written config cites.

A method's version changes whenever a change to this plugin alters the output bytes of the same
config on the same inputs (a new default, another mask rule, another order of operations). A
config pins versions with ``sdxl: {method_version: {tgmd: 2}}``; a version this installation does
not implement is refused with a message naming it (docs/methods.md, "Method versions").

Methods this plugin runs itself (its own, and mergekit's built-ins it merges within the memory
budget with its own chunking and counter-based masks) have integer versions here. Any other
mergekit method is mergekit's own code: its version is ``"mergekit <version>"`` of the installed
mergekit, and a pin to another mergekit version is refused.

Nothing of the package is imported here (like ``version.py``), so every layer may use it.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

__all__ = [
    "METHOD_VERSIONS",
    "IMPLEMENTED_VERSIONS",
    "MethodVersion",
    "installed_mergekit_version",
    "method_version",
    "method_versions",
    "config_methods",
    "format_method_versions",
    "check_method_versions",
    "check_pinned_input_count",
    "GRAM_VERSION_1_MAX_INPUTS",
]

MethodVersion = Union[int, str]

METHOD_VERSIONS: Mapping[str, int] = MappingProxyType(
    {
        # This plugin's methods (docs/methods.md).
        # 2: the Gram of 129 or more inputs sums its sub-block products by adjacent pairs.
        "tgmd": 2,
        "ties_soup": 2,
        "dgmla": 2,
        "geometric_median": 2,
        # mergekit's built-ins as mergekit-sdxl merge runs them within the budget (issue 12):
        # mergekit's math on chunks, this plugin's counter-based masks for the random ones.
        "linear": 1,
        "task_arithmetic": 1,
        "ties": 1,
        "dare_ties": 1,
        "dare_linear": 1,
        "breadcrumbs": 1,
        "breadcrumbs_ties": 1,
        "della": 1,
        "della_linear": 1,
        "model_stock": 1,
        "sce": 1,
        "nearswap": 1,
    }
)
"""The current version of each method whose bytes this plugin defines."""

# Version 1 of the Gram-median methods summed every block's sub-block products by halves, which
# holds 256 N x N products at once (2 GB at N = 1000); version 2 does the same up to 128 inputs
# (the same bytes) and sums by adjacent pairs from 129 on (kernels/geomedian.py). So version 1
# is still run exactly up to this many inputs, and refused beyond.
GRAM_VERSION_1_MAX_INPUTS = 128
_GRAM_METHODS = ("tgmd", "ties_soup", "dgmla", "geometric_median")

IMPLEMENTED_VERSIONS: Mapping[str, Tuple[int, ...]] = MappingProxyType(
    {name: (1, v) if name in _GRAM_METHODS else (v,) for name, v in METHOD_VERSIONS.items()}
)
"""The versions this installation can still run (an older one stays here only while it is reproducible)."""

_MERGEKIT_PREFIX = "mergekit "


def installed_mergekit_version() -> str:
    """The installed mergekit's version (package metadata; mergekit itself is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return "unknown"


def method_version(name: str, mergekit_version: Optional[str] = None) -> MethodVersion:
    """``name``'s current version: an int from :data:`METHOD_VERSIONS`, else ``"mergekit X"``."""
    if name in METHOD_VERSIONS:
        return METHOD_VERSIONS[name]
    return _MERGEKIT_PREFIX + (mergekit_version or installed_mergekit_version())


def method_versions(names: Iterable[str], mergekit_version: Optional[str] = None) -> Dict[str, MethodVersion]:
    """``{name: version}`` for each distinct method of ``names``, in order."""
    return {name: method_version(name, mergekit_version) for name in dict.fromkeys(names)}


def config_methods(config: Mapping[str, Any]) -> Tuple[str, ...]:
    """The merge methods of a parsed merge config: ``merge_method`` first, then the own method of
    each merged ``sdxl.components`` entry (default: the top level's; ``source:`` copies use none),
    each once. Malformed sections give what can be read (the config's validation reports them)."""
    top = config.get("merge_method")
    if not isinstance(top, str):
        return ()
    methods = [top]
    sdxl = config.get("sdxl")
    components = sdxl.get("components") if isinstance(sdxl, Mapping) else None
    if isinstance(components, Mapping):
        for component in components.values():
            if isinstance(component, Mapping) and component.get("source") is None:
                own = component.get("merge_method")
                methods.append(own if isinstance(own, str) else top)
    return tuple(dict.fromkeys(methods))


def _yaml_value(value: MethodVersion) -> str:
    return str(value) if isinstance(value, int) else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_method_versions(versions: Mapping[str, MethodVersion]) -> str:
    """YAML flow mapping, e.g. ``{tgmd: 2}``: what configs write after ``method_version:``."""
    return "{" + ", ".join(f"{name}: {_yaml_value(v)}" for name, v in versions.items()) + "}"


def check_method_versions(pins: Mapping[str, MethodVersion], mergekit_version: Optional[str] = None) -> None:
    """Refuse (ValueError, one line) any pinned version this installation does not implement."""
    for name, wanted in pins.items():
        if isinstance(wanted, bool) or not isinstance(wanted, (int, str)):
            raise ValueError(f"{name}: a method version is an integer (or \"mergekit X\"), got {wanted!r}")
        if name in METHOD_VERSIONS:
            if isinstance(wanted, str):
                raise ValueError(
                    f"{name}: this plugin versions it itself: write {name}: {METHOD_VERSIONS[name]} (got {wanted!r})"
                )
            if wanted not in IMPLEMENTED_VERSIONS[name]:
                runs = [str(v) for v in IMPLEMENTED_VERSIONS[name]]
                have = f"version {runs[0]}" if len(runs) == 1 else f"versions {', '.join(runs[:-1])} and {runs[-1]}"
                newer = "a newer" if wanted > METHOD_VERSIONS[name] else "an older"
                raise ValueError(
                    f"{name}: version {wanted} is not implemented by this mergekit-sdxl (it runs {have}); "
                    f"the config was written for {newer} one: install the mergekit-sdxl that wrote it"
                )
            continue
        if isinstance(wanted, int):
            known = ", ".join(sorted(METHOD_VERSIONS))
            raise ValueError(
                f"{name}: not a method this plugin versions ({known}); "
                f"a method of mergekit itself is pinned as \"mergekit <version>\""
            )
        installed = mergekit_version or installed_mergekit_version()
        if wanted != _MERGEKIT_PREFIX + installed:
            raise ValueError(f"{name}: pinned to {wanted!r}, but mergekit {installed} is installed (its code decides this method)")


def check_pinned_input_count(pins: Mapping[str, MethodVersion], inputs: int) -> None:
    """Refuse (ValueError, one line) a pin this installation reproduces only for fewer inputs."""
    for name in _GRAM_METHODS:
        if pins.get(name) == 1 and inputs > GRAM_VERSION_1_MAX_INPUTS:
            raise ValueError(
                f"{name}: version 1 is reproduced only up to {GRAM_VERSION_1_MAX_INPUTS} inputs and this config has "
                f"{inputs}: pin {name}: {METHOD_VERSIONS[name]} (its Gram sums by adjacent pairs from "
                f"{GRAM_VERSION_1_MAX_INPUTS + 1} inputs on; docs/methods.md, \"Method versions\")"
            )
