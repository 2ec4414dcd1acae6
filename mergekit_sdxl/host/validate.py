"""Check a merge config before any work: syntax, keys, parameters, inputs and sha256 pins.

mergekit reads a config leniently: pydantic drops unknown keys, a global parameter set on
one model is ignored, PyYAML keeps the last of two equal keys, a value error names only
``input_value=1.5``. Each of those loses a setting silently or fails hours into a merge.
:func:`validate_config` runs first and raises :class:`ConfigError` with one line that
names the config file and the key, parameter, model or file concerned.

Paths in a config are read from the current working directory (that is how mergekit
opens them), not from the config file's folder.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import types
from dataclasses import dataclass, field
from typing import (
    Annotated,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
    get_args,
    get_origin,
)

import yaml

from mergekit_sdxl.errors import EXIT_USAGE, UsageError
from mergekit_sdxl.method_versions import check_pinned_input_count

LOG = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "expand_config",
    "check_components",
    "InputEntry",
    "Pin",
    "ValidatedConfig",
    "load_yaml",
    "check_keys",
    "check_method",
    "check_parameters",
    "check_dtypes",
    "config_entries",
    "check_inputs",
    "parse_pins",
    "check_pins",
    "validate_config",
]

# Hints that name the CLI switch; the CLI owns the flag names.
NO_VERIFY_PINS_HINT = "rerun recipe, or pass --no-verify-pins"
ALLOW_BASE_HINT = "remove it from models (mergekit adds the base to the inputs itself where the method uses it)"

Sha256Of = Callable[[str], str]


class ConfigError(UsageError, ValueError):
    """A config that must not be run; the message is one line naming the config file.

    A :class:`~mergekit_sdxl.errors.UsageError` for the CLI (exit 2), and a ValueError for
    callers that catch what pydantic and mergekit raise for bad configs.
    """

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class InputEntry:
    """One input file as a config references it."""

    label: str  # where it is written: "base_model", "models[3]", "slices[0].sources[1]", "sdxl.vae.source"
    path: str  # as mergekit opens it (relative to the current directory)
    role: str  # "base", "model", "lora" or "vae"
    group: str = ""  # the input list it belongs to ("models", "slices[0]", ...); duplicates are per group
    remote: bool = False  # a Hugging Face Hub reference (revision, or an owner/name id that is not a local path)
    lora: Optional[str] = None  # a model entry's LoRA file: the input is that model with that LoRA

    @property
    def name(self) -> str:
        return os.path.basename(self.path) or self.path

    def describe(self) -> str:
        return f"{self.label} ({self.path})"


@dataclass(frozen=True)
class Pin:
    """A ``# sha256: ...  autov2: ...  size: ...`` comment and the entry on the next line."""

    path: str
    sha256: str
    line: int  # 1-based line of the comment
    role: str  # "base", "model" or "lora" (a LoRA entry pins its LoRA file)
    size: Optional[int] = None
    autov2: Optional[str] = None


@dataclass
class ValidatedConfig:
    """What :func:`validate_config` checked; ``raw`` is the YAML as loaded (``sdxl:`` included)."""

    raw: Dict[str, Any]
    method: str
    inputs: List[InputEntry]
    pins: List[Pin]
    warnings: List[str] = field(default_factory=list)
    config: Any = None  # mergekit MergeConfiguration of ``raw`` without ``sdxl:``


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error
    (PyYAML keeps the last one and the first setting is lost without a word)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Dict[Any, Any]:  # type: ignore[override]
        if isinstance(node, yaml.MappingNode):
            first: Dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<" merges may be overridden on purpose
                    continue
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue  # the base class reports unhashable keys
                if key in first:
                    line = first[key].start_mark.line + 1
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {line}; YAML would keep only the last)", key_node.start_mark
                    )
                first[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_error_text(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        text = f"YAML error at {_where(error.problem_mark)}: {error.problem}"
        if error.context:
            context = error.context + (f" at {_where(error.context_mark)}" if error.context_mark is not None else "")
            text += f" ({context})"
        return text
    return "YAML error: " + " ".join(str(error).split())


def load_yaml(text: str, source: str) -> Dict[str, Any]:
    """The config as a mapping; syntax errors and a non-mapping top level are ConfigErrors."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as error:
        raise ConfigError(f"config {source}: {_yaml_error_text(error)}") from None
    if raw is None:
        raise ConfigError(f"config {source}: the file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source}: the top level must be a mapping of keys (merge_method:, models:, ...), not a {_kind(raw)}")
    return raw


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return "null" if value is None else type(value).__name__


def _hint(name: Any, choices: Iterable[str]) -> str:
    choices = sorted(set(choices))
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.6)
    if close:
        return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    return " (known: " + ", ".join(choices) + ")" if choices else ""


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class _Ref:
    path: str
    revision: Optional[str] = None
    lora: Optional[str] = None
    lora_revision: Optional[str] = None


def _split_revision(value: str, where: str, source: str) -> Tuple[str, Optional[str]]:
    # mergekit's ModelPath: "path@revision", more than one "@" is an error.
    if value.count("@") > 1:
        raise ConfigError(f"config {source}: {where}: {value!r} has more than one '@' (mergekit reads 'path@revision'); use {{model: {{path: \"...\"}}}}")
    if "@" in value:
        path, revision = value.split("@")
        return path, revision
    return value, None


def _model_path(value: Any, where: str, source: str) -> Tuple[str, Optional[str]]:
    if isinstance(value, str):
        return _split_revision(value, where, source)
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        revision = value.get("revision")
        return value["path"], revision if isinstance(revision, str) else None
    raise ConfigError(f"config {source}: {where}: expected a path or {{path: \"...\"}}, got a {_kind(value)}")


def _parse_ref(value: Any, where: str, source: str) -> _Ref:
    """A ModelReference as mergekit reads it: ``"model+lora"`` / ``{model: ..., lora: ...}``."""
    if isinstance(value, str):
        chunks = value.split("+")
        if len(chunks) > 2:
            raise ConfigError(f"config {source}: {where}: {value!r} has more than one '+' (mergekit reads 'model+lora'); use {{model: {{path: \"...\"}}}}")
        path, revision = _split_revision(chunks[0], where, source)
        lora, lora_rev = _split_revision(chunks[1], where, source) if len(chunks) == 2 else (None, None)
        if (lora is not None or revision is not None) and os.path.exists(value):
            # A real file named "a+b.safetensors" or "a@b.safetensors": mergekit would open something else.
            what = f"model {path!r} plus LoRA {lora!r}" if lora is not None else f"{path!r} at revision {revision!r}"
            raise ConfigError(
                f"config {source}: {where}: mergekit reads {value!r} as {what}; "
                f"write the file as {{model: {{path: \"{value}\"}}}}"
            )
        return _Ref(path=path, revision=revision, lora=lora, lora_revision=lora_rev)
    if isinstance(value, dict):
        if "model" not in value:
            raise ConfigError(f"config {source}: {where}: no 'model:' in {{{', '.join(map(str, value))}}}")
        path, revision = _model_path(value["model"], f"{where}.model", source)
        lora, lora_rev = (None, None)
        if value.get("lora") is not None:
            lora, lora_rev = _model_path(value["lora"], f"{where}.lora", source)
        return _Ref(path=path, revision=revision, lora=lora, lora_revision=lora_rev)
    raise ConfigError(f"config {source}: {where}: expected a model path or {{model: {{path: \"...\"}}}}, got a {_kind(value)}")


def _file_label(value: Any) -> str:
    """`` (name.safetensors)`` of an entry (``{model: REF, ...}``) or of a reference mapping
    (``{model: PATH, lora: ...}``), ``""`` when neither reads (labels only)."""
    if isinstance(value, dict) and isinstance(value.get("path"), str):  # a ModelPath mapping
        return f" ({os.path.basename(value['path']) or value['path']})"
    for ref in (value.get("model"), value) if isinstance(value, dict) else ():
        try:
            parsed = _parse_ref(ref, "", "")
        except ConfigError:
            continue
        return f" ({os.path.basename(parsed.path) or parsed.path})"
    return ""


# --------------------------------------------------------------------------- keys


_UNIONS = (Union, getattr(types, "UnionType", Union))


def _pydantic_models(annotation: Any) -> List[Any]:
    from pydantic import BaseModel

    out: List[Any] = []
    for arg in get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            out.append(arg)
    return out


def _check_mapping_keys(value: Dict[Any, Any], model: Any, where: str, source: str, extra: Sequence[str] = ()) -> None:
    allowed = list(model.model_fields) + list(extra)
    for key in value:
        if key not in allowed:
            label = "top-level key" if not where else "key"
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"config {source}: {prefix}unknown {label} {str(key)!r}{_hint(key, allowed)}")


def _walk(value: Any, annotation: Any, where: str, source: str) -> None:
    """Unknown keys in ``value`` against the pydantic type ``annotation``, recursively.

    ``parameters`` mappings are skipped: their keys are parameter names (see
    :func:`check_parameters`). Type mismatches are left to mergekit's own validation.
    """
    from pydantic import BaseModel

    origin = get_origin(annotation)
    if origin is Annotated:
        annotation = get_args(annotation)[0]
        origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not isinstance(value, dict) or annotation.model_config.get("extra") == "allow":
            return
        label = where + (_file_label(value) if where and ("model" in annotation.model_fields or "path" in annotation.model_fields) else "")
        _check_mapping_keys(value, annotation, label, source)
        for key, item in value.items():
            if key != "parameters":
                _walk(item, annotation.model_fields[key].annotation, f"{where}.{key}" if where else str(key), source)
        return
    args = get_args(annotation)
    if origin in (list, List, tuple, Tuple) and isinstance(value, list) and args:
        for i, item in enumerate(value):
            _walk(item, args[0], f"{where}[{i}]", source)
    elif origin in (dict, Dict) and isinstance(value, dict) and len(args) == 2:
        for key, item in value.items():
            _walk(item, args[1], f"{where}.{key}", source)
    elif origin in _UNIONS:
        # Walk into the one member that fits the value's shape (mapping -> model or dict, list -> list).
        if isinstance(value, dict):
            members = _pydantic_models(annotation) or [a for a in args if get_origin(a) in (dict, Dict)]
        elif isinstance(value, list):
            members = [a for a in args if get_origin(a) in (list, List)]
        else:
            members = []
        if len(members) == 1:
            _walk(value, members[0], where, source)


def check_keys(raw: Dict[str, Any], source: str) -> None:
    """Unknown keys at the top level, in ``sdxl:``, in every models/slices/modules entry and
    in every model reference mapping, each with a "did you mean" hint."""
    from mergekit_sdxl.host.mergekit_api import MergeConfiguration
    from mergekit_sdxl.workflow.options import SDXLOptions

    _check_mapping_keys(raw, MergeConfiguration, "", source, extra=("sdxl",))
    for key, item in raw.items():
        if key == "sdxl":
            if item is not None and not isinstance(item, dict):
                raise ConfigError(f"config {source}: sdxl: expected a mapping (vae:, memory_budget:, allow_vpred_mix:, components:), got a {_kind(item)}")
            _walk(item or {}, SDXLOptions, "sdxl", source)
        elif key != "parameters":
            _walk(item, MergeConfiguration.model_fields[key].annotation, str(key), source)


# --------------------------------------------------------------------------- structure


@dataclass
class _Entry:
    label: str  # "models[3] (a.safetensors)"
    where: str  # "models[3]"
    ref: _Ref
    parameters: Optional[Dict[str, Any]]


@dataclass
class _Group:
    """One input list: the models of ``models:``, of one slice, or of one module."""

    name: str
    entries: List[_Entry]
    base: Optional[Tuple[str, _Ref]]  # (label, ref)
    scopes: List[Tuple[str, Optional[Dict[str, Any]]]]  # enclosing parameter mappings, innermost first
    adds_base: bool = False  # a models: list, to which mergekit appends the base when it is not listed


def _as_list(value: Any, where: str, source: str, what: str) -> List[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"config {source}: {where}: expected a list of {what}, got a {_kind(value)}")
    return value


def _as_params(value: Any, where: str, source: str) -> Optional[Dict[str, Any]]:
    if value is None or isinstance(value, dict):
        return value
    at = f"{where}.parameters" if where else "parameters"
    raise ConfigError(f"config {source}: {at}: expected a mapping of parameter names to values, got a {_kind(value)}")


def _entries(items: List[Any], where: str, source: str, what: str) -> List[_Entry]:
    out: List[_Entry] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or "model" not in item:
            raise ConfigError(f"config {source}: {at}: expected a mapping like '- model: ...'{'' if what == 'models' else ' with layer_range:'}, got a {_kind(item)}")
        ref = _parse_ref(item["model"], f"{at}.model", source)
        out.append(_Entry(label=f"{at} ({os.path.basename(ref.path) or ref.path})", where=at, ref=ref, parameters=_as_params(item.get("parameters"), at, source)))
    return out


def _base(value: Any, where: str, source: str) -> Optional[Tuple[str, _Ref]]:
    return None if value is None else (where, _parse_ref(value, where, source))


def _slice_groups(slices: Any, where: str, base, outer, source: str) -> List[_Group]:
    groups: List[_Group] = []
    for s, item in enumerate(_as_list(slices, where, source, "slices")):
        at = f"{where}[{s}]"
        if not isinstance(item, dict):
            raise ConfigError(f"config {source}: {at}: expected a mapping with sources:, got a {_kind(item)}")
        sources = _entries(_as_list(item.get("sources"), f"{at}.sources", source, "sources"), f"{at}.sources", source, "sources")
        slice_base = _base(item.get("base_model"), f"{at}.base_model", source) or base
        groups.append(_Group(at, sources, slice_base, [(at, _as_params(item.get("parameters"), at, source))] + outer))
    return groups


def _groups(raw: Dict[str, Any], source: str) -> List[_Group]:
    """Every input list of the config with its base and enclosing parameter scopes."""
    base = _base(raw.get("base_model"), "base_model", source)
    top = [("parameters", _as_params(raw.get("parameters"), "", source))]
    groups: List[_Group] = []
    if raw.get("models") is not None:
        items = _as_list(raw["models"], "models", source, "models")
        groups.append(_Group("models", _entries(items, "models", source, "models"), base, top, adds_base=True))
    groups += _slice_groups(raw.get("slices"), "slices", base, top, source)
    modules = raw.get("modules") or {}
    if not isinstance(modules, dict):
        raise ConfigError(f"config {source}: modules: expected a mapping of module names, got a {_kind(modules)}")
    for name, module in modules.items():
        at = f"modules.{name}"
        if not isinstance(module, dict):
            raise ConfigError(f"config {source}: {at}: expected a mapping with models: or slices:, got a {_kind(module)}")
        scopes = [(at, _as_params(module.get("parameters"), at, source))] + top
        if module.get("models") is not None:
            items = _as_list(module["models"], f"{at}.models", source, "models")
            groups.append(_Group(f"{at}.models", _entries(items, f"{at}.models", source, "models"), base, scopes, adds_base=True))
        groups += _slice_groups(module.get("slices"), f"{at}.slices", base, scopes, source)
    return groups


# --------------------------------------------------------------------------- method and parameters


def _method_spec(name: Any, source: str):
    from mergekit_sdxl.host.mergekit_api import registered_methods
    from mergekit_sdxl.host.plugin import register_all

    register_all()  # the plugin's methods must be in the registry

    methods = {m.spec.name: m for m in registered_methods()}
    if name is None:
        raise ConfigError(f"config {source}: no merge_method (known: {', '.join(sorted(methods))})")
    if not isinstance(name, str) or name not in methods:
        raise ConfigError(f"config {source}: unknown merge_method {str(name)!r}{_hint(name, methods)}")
    return methods[name].spec


def check_method(raw: Dict[str, Any], source: str):
    """The merge method's spec (mergekit ``MergeMethodSpec``); an unknown name is an error."""
    return _method_spec(raw.get("merge_method"), source)


def _scalar_type(annotation: Any) -> Any:
    """The scalar Python type under ``Annotated[...]`` / ``Optional[...]`` (or the Literal)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar_type(get_args(annotation)[0])
    if origin in _UNIONS:
        members = [a for a in get_args(annotation) if a is not type(None)]
        return _scalar_type(members[0]) if len(members) == 1 else annotation
    return annotation


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan" if math.isnan(value) else repr(value))
    return repr(value)


# Checks the plugin's kernels make at merge time beyond the declared types
# (mergekit_sdxl.kernels.tgmd.TGMDParams): fail here instead, before any tensor is read.
_KERNEL_CHECKS: Dict[Tuple[str, str], Tuple[Callable[[Any], bool], str]] = {
    ("tgmd", "maxiter"): (lambda v: v >= 1, "must be at least 1"),
    ("ties_soup", "maxiter"): (lambda v: v >= 1, "must be at least 1"),
    ("dgmla", "maxiter"): (lambda v: v >= 1, "must be at least 1"),
}


def _scalar_problem(method: str, spec: Any, value: Any) -> Optional[str]:
    """Why ``value`` is not a valid scalar for the parameter ``spec``, or None."""
    from pydantic import ValidationError

    kind = _scalar_type(spec.value_type)
    if not isinstance(value, (bool, int, float, str)):
        return f"expected a single value, got a {_kind(value)}"
    if kind in (int, float) and isinstance(value, bool):
        return f"expected a number, got the boolean {_show(value)}"  # pydantic would take true as 1.0
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    try:
        checked = spec.validate(value)
    except (ValidationError, ValueError, TypeError) as error:
        errors = getattr(error, "errors", None)
        message = errors()[0]["msg"] if callable(errors) else str(error)
        return message[:1].lower() + message[1:]
    if isinstance(checked, float) and not math.isfinite(checked):
        return "must be a finite number"
    extra = _KERNEL_CHECKS.get((method, spec.name))
    if extra is not None and not extra[0](checked):
        return extra[1]
    return None


def _setting_problems(method: str, spec: Any, setting: Any) -> Iterable[Tuple[str, Any, str]]:
    """(position, value, problem) for each bad scalar in a mergekit ParameterSetting:
    a scalar, a gradient list, a ``{filter, value}`` mapping or a list of those."""
    if setting is None:
        yield "", setting, "has no value"
        return
    if isinstance(setting, dict):
        setting = [setting]
        single = True
    else:
        single = False
    if not isinstance(setting, list):
        problem = _scalar_problem(method, spec, setting)
        if problem:
            yield "", setting, problem
        return
    if not setting:
        yield "", setting, "is an empty list (it sets nothing; mergekit falls back to the default)"
        return
    if all(not isinstance(v, (dict, list)) for v in setting):
        for i, item in enumerate(setting):
            problem = _scalar_problem(method, spec, item)
            if problem:
                yield f" (gradient item {i})", item, problem
        return
    for i, cond in enumerate(setting):
        at = "" if single else f" (item {i})"
        if not isinstance(cond, dict):
            yield at, cond, "a list mixes plain values with {filter:, value:} entries"
            continue
        for key in cond:
            if key not in ("filter", "value"):
                yield at, cond, f"unknown key {str(key)!r} in a filter entry{_hint(key, ('filter', 'value'))}"
        if "value" not in cond:
            yield at, cond, "a filter entry needs value:"
            continue
        flt = cond.get("filter")
        if flt is not None and not isinstance(flt, str):
            yield at, flt, "filter: must be a string (a substring of the tensor name)"
        where = f" (filter {flt!r})" if flt is not None else " (fallback entry)"
        value = cond["value"]
        values = value if isinstance(value, list) else [value]
        if not values:
            yield where, value, "is an empty list"
        for j, item in enumerate(values):
            problem = _scalar_problem(method, spec, item)
            if problem:
                yield where + (f" (gradient item {j})" if isinstance(value, list) else ""), item, problem


def _check_scope(
    method: str,
    specs: Dict[str, Any],
    per_model: Dict[str, Any],
    params: Optional[Dict[str, Any]],
    prefix: str,
    one_model: bool,
    source: str,
    scope: str = "the top-level parameters:",
) -> None:
    for name, setting in (params or {}).items():
        allowed = per_model if one_model else specs
        if name not in allowed:
            if one_model and name in specs:
                raise ConfigError(
                    f"config {source}: {prefix}{name!r} is a global parameter of merge method {method}; "
                    f"mergekit ignores it when set per model: move it to {scope}"
                )
            raise ConfigError(f"config {source}: {prefix}unknown parameter {str(name)!r} for merge method {method}{_hint(name, allowed)}")
        for position, value, problem in _setting_problems(method, allowed[name], setting):
            raise ConfigError(f"config {source}: {prefix}parameter {name!r} = {_show(value)}{position}: {problem}")


def _check_required(spec: Any, group: _Group, source: str, scope: str = "the top-level parameters:") -> None:
    """Required parameters that no scope sets (mergekit fails on them only while planning);
    ``scope`` names the mapping where a shared value goes."""
    from mergekit_sdxl.host.mergekit_api import BasePolicy, ParameterScope

    def set_in(scopes: Iterable[Tuple[str, Optional[Dict[str, Any]]]], name: str) -> bool:
        return any(params and name in params for _, params in scopes)

    base_label, base = group.base if group.base is not None else ("", None)
    for p in spec.parameters:
        if not p.required or set_in(group.scopes, p.name):
            continue
        if p.scope == ParameterScope.SHARED:
            raise ConfigError(f"config {source}: merge method {spec.name} needs parameter {p.name!r}: set it under {scope.replace('the top-level ', '')}")
        for entry in group.entries:
            is_base = base is not None and entry.ref == base  # mergekit compares references, not files
            if not set_in([("", entry.parameters)], p.name) and not (is_base and p.scope == ParameterScope.NON_BASE):
                raise ConfigError(
                    f"config {source}: {entry.label}: merge method {spec.name} needs parameter {p.name!r} "
                    f"for every model: set it here or under {scope}"
                )
        base_added = group.adds_base and spec.contract.base != BasePolicy.FORBIDDEN
        if p.scope == ParameterScope.INPUT and base is not None and base_added and all(e.ref != base for e in group.entries):
            raise ConfigError(
                f"config {source}: {base_label} ({os.path.basename(base.path)}): merge method {spec.name} needs parameter "
                f"{p.name!r} for the base too (mergekit adds the base to the inputs): set it under {scope}"
            )


def _check_base_policy(spec: Any, groups: List[_Group], source: str) -> None:
    from mergekit_sdxl.host.mergekit_api import BasePolicy

    for group in groups:
        if spec.contract.base == BasePolicy.REQUIRED and group.base is None:
            raise ConfigError(f"config {source}: merge method {spec.name} needs a base_model")
        if spec.contract.base == BasePolicy.FORBIDDEN and group.base is not None:
            raise ConfigError(f"config {source}: {group.base[0]}: merge method {spec.name} takes no base_model")


def check_parameters(raw: Dict[str, Any], source: str) -> None:
    """Parameter names and values against the merge method's declared parameters.

    Global scopes (top-level, slice, module ``parameters:``) take global and per-model
    names (a per-model name there is every model's default); a model entry takes only
    per-model names, because mergekit ignores a global one there. Every scalar, including
    each gradient point and each ``{filter, value}``, is checked against its type, range and
    finiteness, so ``lambda: .inf`` fails here and not after hours of merging.
    """
    raw = expand_config(raw, source)  # {mbw: ...} settings are checked as the filter lists they stand for
    spec = check_method(raw, source)
    specs = {p.name: p for p in spec.parameters}
    per_model = {p.name: p for p in spec.input_parameters}
    groups = _groups(raw, source)
    _check_scope(spec.name, specs, per_model, raw.get("parameters"), "", False, source)
    seen_scopes = {"parameters"}
    for group in groups:
        for label, params in group.scopes:
            if label not in seen_scopes:
                seen_scopes.add(label)
                _check_scope(spec.name, specs, per_model, params, f"{label}: ", False, source)
        for entry in group.entries:
            _check_scope(spec.name, specs, per_model, entry.parameters, f"{entry.label}: ", True, source)
    _check_base_policy(spec, groups, source)
    for group in groups:
        _check_required(spec, group, source)


_DTYPES = ("bfloat16", "float16", "float32", "float64")
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64"}


def check_dtypes(raw: Dict[str, Any], source: str) -> None:
    """``dtype`` / ``out_dtype`` name a floating-point type mergekit knows."""
    for key in ("dtype", "out_dtype"):
        value = raw.get(key)
        if value is None:
            continue
        name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
        if name not in _DTYPES:
            alias = _DTYPE_ALIASES.get(str(name).lower())
            hint = f" (did you mean {alias!r}?)" if alias else _hint(name, _DTYPES)
            raise ConfigError(f"config {source}: {key}: {_show(value)} is not a floating-point dtype{hint}")


# --------------------------------------------------------------------------- inputs

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _is_remote(path: str, revision: Optional[str]) -> bool:
    """A reference mergekit would fetch from the Hub rather than open locally."""
    if os.path.exists(path):
        return False
    if revision is not None:
        return True
    return bool(_HUB_ID.fullmatch(path)) and not path.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin"))


def config_entries(raw: Dict[str, Any], source: str) -> List[InputEntry]:
    """Every input file the config names (base first, models in order, LoRAs, the VAE source)."""
    out: List[InputEntry] = []
    groups = _groups(raw, source)
    for label, ref in dict(g.base for g in groups if g.base is not None).items():  # each base_model once
        out.append(InputEntry(label, ref.path, "base", "", _is_remote(ref.path, ref.revision)))
    for group in groups:
        for entry in group.entries:
            ref = entry.ref
            out.append(InputEntry(entry.where, ref.path, "model", group.name, _is_remote(ref.path, ref.revision), ref.lora))
            if ref.lora is not None:
                out.append(InputEntry(f"{entry.where} lora", ref.lora, "lora", "", _is_remote(ref.lora, ref.lora_revision)))
    vae = (raw.get("sdxl") or {}).get("vae") if isinstance(raw.get("sdxl"), dict) else None
    vae_source = vae.get("source") if isinstance(vae, dict) else None
    if isinstance(vae_source, str) and vae_source not in ("base", "merge"):
        out.append(InputEntry("sdxl.vae.source", vae_source, "vae"))
    return out


def _identity(path: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    """What makes two spellings one file: the resolved path, and (device, inode) for hard links."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path), None
    return os.path.realpath(path), (st.st_dev, st.st_ino)


class _FileSet:
    """Entries seen so far, found again by either part of their identity."""

    def __init__(self) -> None:
        self._by: Dict[Any, InputEntry] = {}

    def find(self, path: str) -> Optional[InputEntry]:
        real, inode = _identity(path)
        return self._by.get(("path", real)) or (self._by.get(("inode", inode)) if inode else None)

    def add(self, entry: InputEntry) -> None:
        real, inode = _identity(entry.path)
        self._by.setdefault(("path", real), entry)
        if inode:
            self._by.setdefault(("inode", inode), entry)


def _check_exists(entry: InputEntry, config_dir: str, source: str) -> Optional[str]:
    """Error for a missing local file, a warning text for a Hub reference, else None."""
    if entry.remote:
        return f"config {source}: {entry.describe()} is not a local path; mergekit will look it up on the Hugging Face Hub"
    if os.path.exists(entry.path):
        return None
    hint = f" (paths are read from the current directory {os.getcwd()}"
    beside = os.path.join(config_dir, entry.path)
    if not os.path.isabs(entry.path) and config_dir and os.path.exists(beside):
        hint += f"; it exists beside the config as {beside}"
    raise ConfigError(f"config {source}: {entry.describe()}: file not found{hint})")


class _Memo:
    """One sha256 per file per run, whatever asks for it (pins, duplicate contents)."""

    def __init__(self, sha256_of: Sha256Of) -> None:
        self._of = sha256_of
        self._done: Dict[str, str] = {}

    def __call__(self, path: str) -> str:
        key = os.path.realpath(path)
        if key not in self._done:
            self._done[key] = self._of(path).lower()
        return self._done[key]


def _is_models_list(group: str) -> bool:
    # "models" / "modules.X.models": mergekit adds the base to these itself. Slice sources
    # are different: there the base must be listed among the sources.
    return group == "models" or group.endswith(".models")


def _check_duplicates(entries: List[InputEntry], allow_base_in_models: bool, source: str) -> None:
    bases = _FileSet()
    for e in entries:
        if e.role == "base" and not e.remote:
            bases.add(e)
    groups: Dict[str, _FileSet] = {}
    with_lora: Dict[Tuple[str, Any], InputEntry] = {}
    for entry in entries:
        if entry.role != "model" or entry.remote:
            continue
        if entry.lora is not None:  # one input per (model, LoRA) pair: the base with many LoRAs is fine
            pair = (entry.group, (_identity(entry.path), _identity(entry.lora)))
            if pair in with_lora:
                first = with_lora[pair]
                raise ConfigError(f"config {source}: {entry.describe()} with LoRA {entry.lora} is the same input as {first.describe()}: list each input once")
            with_lora[pair] = entry
            continue
        seen = groups.setdefault(entry.group, _FileSet())
        earlier = seen.find(entry.path)
        if earlier is not None:
            raise ConfigError(f"config {source}: {entry.describe()} is the same file as {earlier.describe()}: list each input once")
        base = bases.find(entry.path)
        if base is not None and _is_models_list(entry.group) and not allow_base_in_models:
            raise ConfigError(f"config {source}: {entry.describe()} is the base model ({base.describe()}): {ALLOW_BASE_HINT}")
        seen.add(entry)


def _same_content_warnings(entries: List[InputEntry], sha256_of: Sha256Of, source: str) -> List[str]:
    """Different files with equal bytes; only files of equal size are hashed."""
    by_size: Dict[int, List[InputEntry]] = {}
    for e in entries:
        if e.role in ("base", "model") and not e.remote and os.path.isfile(e.path):
            by_size.setdefault(os.path.getsize(e.path), []).append(e)
    warnings: List[str] = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        files = _FileSet()
        first: Dict[str, InputEntry] = {}
        for e in same_size:
            if files.find(e.path) is not None:
                continue  # the same file again (an allowed base in models, another slice): not a copy
            files.add(e)
            digest = sha256_of(e.path)
            if digest in first:
                warnings.append(
                    f"config {source}: {e.describe()} has the same content as {first[digest].describe()} "
                    f"(sha256 {digest[:10]}); it will count twice in the merge"
                )
            else:
                first[digest] = e
    return warnings


def check_inputs(
    entries: List[InputEntry],
    source: str,
    *,
    allow_base_in_models: bool = False,
    sha256_of: Optional[Sha256Of] = None,
    config_dir: str = "",
) -> List[str]:
    """Missing files, the same file listed twice in one input list, the base listed again
    under models (errors); copies with the same sha256 (returned as warnings)."""
    warnings: List[str] = []
    for entry in entries:
        note = _check_exists(entry, config_dir, source)
        if note:
            warnings.append(note)
    _check_duplicates(entries, allow_base_in_models, source)
    if sha256_of is not None:
        warnings += _same_content_warnings(entries, sha256_of, source)
    return warnings


# --------------------------------------------------------------------------- pins

_PIN = re.compile(r"^\s*#\s*sha256:\s*([0-9A-Fa-f]{64})\b(?:.*?\bautov2:\s*(\S+))?(?:.*?\bsize:\s*(\d+))?")


def _pinned_entry(line: str) -> Optional[Tuple[str, str]]:
    """(role, path) of a ``base_model: ...`` or ``- model: ...`` line, None for anything else."""
    stripped = line.strip()
    if not (stripped.startswith("base_model:") or re.match(r"-\s+model:", stripped)):
        return None
    try:
        value = yaml.safe_load(stripped)
    except yaml.YAMLError:
        return None
    item = value[0] if isinstance(value, list) and value else value
    if not isinstance(item, dict):
        return None
    role, ref = ("base", item.get("base_model")) if "base_model" in item else ("model", item.get("model"))
    try:
        parsed = _parse_ref(ref, "", "")
    except ConfigError:
        return None
    return ("lora", parsed.lora) if parsed.lora is not None else (role, parsed.path)  # a LoRA entry pins its LoRA


def parse_pins(text: str, source: str = "config", warnings: Optional[List[str]] = None) -> List[Pin]:
    """The sha256 pins ``render_recipe_yaml`` writes, each with the path on the next line.

    A pin comment not followed by a ``base_model:`` / ``- model:`` line is skipped with a
    warning (appended to ``warnings``): an edited recipe must not fail on a stray comment.
    """
    lines = text.splitlines()
    pins: List[Pin] = []
    for i, line in enumerate(lines):
        match = _PIN.match(line)
        if not match:
            continue
        target = _pinned_entry(lines[i + 1]) if i + 1 < len(lines) else None
        if target is None:
            note = f"config {source}: the sha256 pin at line {i + 1} is not followed by a base_model: or '- model:' line; ignored"
            LOG.warning("%s", note)
            if warnings is not None:
                warnings.append(note)
            continue
        sha, autov2, size = match.groups()
        pins.append(Pin(path=target[1], sha256=sha.lower(), line=i + 1, role=target[0], size=int(size) if size else None, autov2=autov2))
    return pins


def check_pins(pins: Sequence[Pin], sha256_of: Optional[Sha256Of], *, source: str = "config") -> None:
    """Each pinned file exists and has the pinned size and sha256.

    Every size is checked before any file is hashed, so a changed file late in the list
    fails at once. With ``sha256_of=None`` only existence and sizes are checked.
    """
    def fail(pin: Pin, what: str) -> ConfigError:
        return ConfigError(f"config {source}: {pin.path} (pinned at line {pin.line}): {what} (the file changed since the recipe was written; {NO_VERIFY_PINS_HINT})")

    for pin in pins:
        try:
            size = os.path.getsize(pin.path)
        except OSError:
            raise fail(pin, "file not found") from None
        if pin.size is not None and size != pin.size:
            raise fail(pin, f"size is {size} bytes, but the recipe pins {pin.size}")
    if sha256_of is None:
        return
    for pin in pins:
        actual = sha256_of(pin.path).lower()
        if actual != pin.sha256:
            raise fail(pin, f"sha256 is {actual}, but the recipe pins {pin.sha256}")


# --------------------------------------------------------------------------- block weights


def _locator(text: str) -> Callable[[Sequence[Any]], Optional[str]]:
    """``locate(path)``: "line L, column C" of the value at a path of keys and indices in ``text``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None

    def locate(path: Sequence[Any]) -> Optional[str]:
        node = root
        for part in path:
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                node = node.value[part]
            else:
                return None
        return _where(node.start_mark) if node is not None else None

    return locate


def expand_config(raw: Dict[str, Any], source: str, text: Optional[str] = None) -> Dict[str, Any]:
    """``raw`` with every ``{mbw: ...}`` block-weight setting expanded into mergekit's
    ``{filter, value}`` list (:mod:`mergekit_sdxl.workflow.block_weights`); a bad one is a
    ConfigError naming the entry and the parameter (and its line, given the config ``text``)."""
    from mergekit_sdxl.workflow.block_weights import BlockWeightsError, expand_block_weights

    try:
        return expand_block_weights(raw, source=source, locate=_locator(text) if text is not None else None)
    except BlockWeightsError as error:
        raise ConfigError(str(error)) from None


# --------------------------------------------------------------------------- per-component merges


def _same_ref(a: _Ref, b: _Ref) -> bool:
    # One file however its path is spelled (the planner matches the same way).
    return (os.path.realpath(a.path), a.lora) == (os.path.realpath(b.path), b.lora)


def _component_inputs(raw: Dict[str, Any], groups: List[_Group], name: str, where: str, source: str) -> Tuple[_Group, List[Any]]:
    """The input list that feeds component ``name`` and its raw entries."""
    if raw.get("models") is not None:
        return next(g for g in groups if g.name == "models"), raw["models"]
    modules = raw.get("modules")
    if isinstance(modules, dict):
        module = modules.get(name)
        group = next((g for g in groups if g.name == f"modules.{name}.models"), None)
        if group is not None and isinstance(module, dict):
            return group, module["models"]
        if module is None:
            raise ConfigError(f"config {source}: {where}: the config's modules: has no {name} (nothing of it is merged)")
        raise ConfigError(f"config {source}: {where}: needs modules.{name}.models:, not slices:")
    raise ConfigError(f"config {source}: {where}: needs the inputs listed under models: (SDXL configs cannot use slices:)")


def _check_component_source(value: Any, group: _Group, where: str, source: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"config {source}: {where}.source: expected 'base' or the path of one of the models, got {_show(value)}")
    if value == "base":
        if group.base is None:
            raise ConfigError(f"config {source}: {where}.source: base, but the config has no base_model")
        return
    wanted = _parse_ref(value, f"{where}.source", source)
    known = [e.ref for e in group.entries] + ([group.base[1]] if group.base is not None else [])
    if not any(_same_ref(wanted, ref) for ref in known):
        names = ", ".join(os.path.basename(r.path) for r in known)
        raise ConfigError(
            f"config {source}: {where}.source: {value} is not one of the models of this merge ({names}); "
            "use base or the path of a listed model"
        )


def _component_entries(section: Dict[str, Any], group: _Group, where: str, source: str) -> List[_Entry]:
    """The models of a component's merge: its own ``models:`` (each a model of the merge, once) or
    all of the group's, without their per-model parameters."""
    if section.get("models") is None:
        return [_Entry(e.label, e.where, e.ref, None) for e in group.entries]
    entries = _entries(_as_list(section["models"], f"{where}.models", source, "models"), f"{where}.models", source, "models")
    for i, entry in enumerate(entries):
        if not any(_same_ref(entry.ref, e.ref) for e in group.entries):
            hint = " (mergekit adds the base to the inputs itself)" if group.base is not None and _same_ref(entry.ref, group.base[1]) else ""
            raise ConfigError(f"config {source}: {entry.label}: not one of the config's models: list it under models: first{hint}")
        earlier = next((e for e in entries[:i] if _same_ref(e.ref, entry.ref)), None)
        if earlier is not None:
            raise ConfigError(f"config {source}: {entry.label} is the same file as {earlier.label}: list each input once")
    return entries


def check_components(raw: Dict[str, Any], source: str) -> None:
    """``sdxl.components``: each entry names unet, clip_l or clip_g and either copies it
    (``source: base`` or the path of one of the models) or merges it with its own method,
    parameters and models (a subset of the config's models), checked as the top level is."""
    from mergekit_sdxl.host.mergekit_api import MergeConfiguration
    from mergekit_sdxl.workflow.options import COMPONENT_OVERRIDES

    sdxl = raw.get("sdxl")
    components = sdxl.get("components") if isinstance(sdxl, dict) else None
    if components is None:
        return
    if not isinstance(components, dict):
        raise ConfigError(f"config {source}: sdxl.components: expected a mapping of components (unet:, clip_l:, clip_g:), got a {_kind(components)}")
    groups = _groups(raw, source)
    for name, section in components.items():
        where = f"sdxl.components.{name}"
        if name not in COMPONENT_OVERRIDES:
            hint = " (the VAE is chosen with sdxl.vae.source)" if name == "vae" else _hint(name, COMPONENT_OVERRIDES)
            raise ConfigError(f"config {source}: sdxl.components: unknown component {str(name)!r}{hint}")
        if not isinstance(section, dict):
            raise ConfigError(f"config {source}: {where}: expected a mapping (source:, or merge_method:/parameters:/models:), got a {_kind(section)}")
        group, items = _component_inputs(raw, groups, name, where, source)
        merge = [key for key in ("merge_method", "parameters", "models") if section.get(key) is not None]
        if section.get("source") is not None:
            if merge:
                raise ConfigError(f"config {source}: {where}: source: copies {name} unmerged; remove {', '.join(k + ':' for k in merge)} or source:")
            _check_component_source(section["source"], group, where, source)
            continue
        if not merge:
            raise ConfigError(f"config {source}: {where}: give source: (copy it from base or one model) or merge_method:/parameters:/models: (merge it)")
        method = section.get("merge_method", raw.get("merge_method"))
        try:
            spec = _method_spec(method, source)
        except ConfigError as error:
            raise ConfigError(str(error).replace(f"config {source}: ", f"config {source}: {where}: ", 1)) from None
        params = _as_params(section.get("parameters"), where, source)
        entries = _component_entries(section, group, where, source)
        specs = {p.name: p for p in spec.parameters}
        per_model = {p.name: p for p in spec.input_parameters}
        _check_scope(spec.name, specs, per_model, params, f"{where}: ", False, source)
        for entry in entries:
            _check_scope(spec.name, specs, per_model, entry.parameters, f"{entry.label}: ", True, source, f"{where}.parameters:")
        own = _Group(f"{where}.models", entries, group.base, [(where, params)], adds_base=True)
        _check_base_policy(spec, [own], source)
        _check_required(spec, own, source, scope=f"{where}.parameters:")
        models = section["models"] if section.get("models") is not None else [{"model": item["model"]} for item in items]
        sub = {"merge_method": spec.name, "models": models, "parameters": params}
        if raw.get("base_model") is not None:
            sub["base_model"] = raw["base_model"]
        _pydantic_validate(MergeConfiguration, sub, where, source)


# --------------------------------------------------------------------------- mergekit's own validation


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)) and not str(part)[:1].isupper() and str(part) not in ("str", "int", "float", "bool", "list", "dict"):
            out += ("." if out else "") + str(part)
        else:
            break  # pydantic's union member names ("ModelReference", "list[...]") from here on
    return out


def _pydantic_validate(model: Any, data: Any, prefix: str, source: str) -> Any:
    """``model.model_validate(data)`` with its first error as one line."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(p for p in (prefix, _loc(first["loc"])) if p)
        message = re.sub(r"^(Value|Assertion) error, ", "", first["msg"])
        raise ConfigError(f"config {source}: {where + ': ' if where else ''}{message}") from None
    except (ValueError, RuntimeError, TypeError) as error:  # mergekit's validators raise RuntimeError
        raise ConfigError(f"config {source}: {prefix + ': ' if prefix else ''}{' '.join(str(error).split())}") from None


def _mergekit_config(raw: Dict[str, Any], source: str) -> Any:
    """mergekit's MergeConfiguration of ``raw`` (``sdxl:`` checked against SDXLOptions)."""
    from mergekit_sdxl.host.mergekit_api import MergeConfiguration
    from mergekit_sdxl.workflow.options import SDXLOptions

    _pydantic_validate(SDXLOptions, raw.get("sdxl") or {}, "sdxl", source)
    return _pydantic_validate(MergeConfiguration, {k: v for k, v in raw.items() if k != "sdxl"}, "", source)


# --------------------------------------------------------------------------- entry point


def _check_version_input_count(raw: Dict[str, Any], entries: List[InputEntry], source: str) -> None:
    sdxl = raw.get("sdxl")
    pins = sdxl.get("method_version") if isinstance(sdxl, dict) else None
    if not isinstance(pins, dict):
        return
    inputs = sum(1 for e in entries if e.role == "model")
    try:
        check_pinned_input_count(pins, inputs)
    except ValueError as error:
        raise ConfigError(f"config {source}: sdxl.method_version: {error}") from None


def validate_config(
    text: str,
    *,
    source: str,
    allow_base_in_models: bool = False,
    sha256_of: Optional[Sha256Of] = None,
    verify_pins: bool = True,
    check_files: bool = True,
) -> ValidatedConfig:
    """Everything checkable before a merge starts, cheapest first; raises :class:`ConfigError`.

    ``source`` is the config's path as the user gave it (it starts every message).
    ``sha256_of`` (e.g. a ``HashCache.sha256``) verifies the pins and finds copies listed
    under two names; without it pins are checked by size only (with a warning).
    ``check_files=False`` checks only the text (templates with placeholder paths).
    Warnings are logged and returned.
    """
    loaded = load_yaml(text, source)
    check_keys(loaded, source)
    raw = expand_config(loaded, source, text)  # mergekit's own grammar from here on
    spec = check_method(raw, source)
    check_parameters(raw, source)
    check_components(raw, source)
    check_dtypes(raw, source)
    config = _mergekit_config(raw, source)
    entries = config_entries(raw, source)
    _check_version_input_count(raw, entries, source)
    pin_notes: List[str] = []
    pins = parse_pins(text, source, pin_notes)  # logs its own notes
    warnings: List[str] = []
    if check_files:
        hasher = _Memo(sha256_of) if sha256_of is not None else None
        warnings += check_inputs(
            entries, source, allow_base_in_models=allow_base_in_models, sha256_of=hasher,
            config_dir=os.path.dirname(source),
        )
        if verify_pins and pins:
            check_pins(pins, hasher, source=source)
            if hasher is None:
                warnings.append(f"config {source}: sha256 pins checked by size only (no hasher given)")
    for note in warnings:
        LOG.warning("%s", note)
    return ValidatedConfig(raw=loaded, method=spec.name, inputs=entries, pins=pins, warnings=pin_notes + warnings, config=config)


def check_contents(validated: ValidatedConfig, *, source: str, sha256_of: Sha256Of, verify_pins: bool = True) -> List[str]:
    """The checks that read whole files, run after the header checks: the recipe's sha256 pins
    (an error naming the file) and copies of one file listed under two names (warnings, logged)."""
    hasher = _Memo(sha256_of)
    if verify_pins and validated.pins:
        check_pins(validated.pins, hasher, source=source)
    warnings = _same_content_warnings(validated.inputs, hasher, source)
    for note in warnings:
        LOG.warning("%s", note)
    return warnings
