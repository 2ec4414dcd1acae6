"""Read sd-mecha's ``.mecha`` recipe text format into a graph of nodes (no merging, no mergekit).

A recipe is one instruction per line; each instruction's result gets the next index, and later
lines refer to it as ``&N``. Two generations of the format exist in published recipes
(ljleb/sd-mecha ``sd_mecha/recipe_serializer.py``, later ``sd_mecha/serialization.py``):

* **legacy** (sd-mecha 0.0.x, no header line)::

      model "raw/a.safetensors" "sdxl" "base"
      merge "subtract" &0 &1
      merge "ties_sum_with_dropout" &2 &3 probability=0.1 vote_sgn=1.0 seed=240603
      dict key=value ...
      parameter "name" "BASE" ["sdxl"]

  Hyperparameters are numbers; backslashes are literal (Windows paths were written as is).
* **version 0.1.0** (sd-mecha 0.1.0rc1 and later; first line ``version 0.1.0``)::

      version 0.1.0
      model "raw\\\\a.safetensors" model_config="sdxl-sgm" merge_space="weight"
      merge "add_difference" &2 &15 1.0
      merge "ties_sum_with_dropout" &3 &5 vote_sgn=true apply_median=true seed=250608
      literal ... model_config=... merge_space=...
      # comment

  Adds the constants ``true`` / ``false`` / ``null``, backslash escapes inside quotes,
  positional hyperparameters and ``#`` comments.

Values: ``&N`` (an earlier instruction), ``"text"``, ``true``/``false``/``null``, a float when the
token holds ``.`` or ``e``, else an int. Blank lines and comments are accepted in both formats and
produce no result. Every error is one :class:`MechaRecipeError` line: ``RECIPE:LINE: what``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.text import printable

__all__ = [
    "FORMAT_VERSIONS",
    "DictNode",
    "LiteralNode",
    "MechaRecipe",
    "MechaRecipeError",
    "MergeNode",
    "ModelNode",
    "Node",
    "ParameterNode",
    "Value",
    "parse_recipe",
    "read_recipe",
]

# The header versions this parser knows (sd-mecha's MECHA_FORMAT_VERSION; None = legacy, no header).
FORMAT_VERSIONS = ("0.1.0",)

_CONSTANTS: Dict[str, Union[bool, None]] = {"null": None, "true": True, "false": False}


class MechaRecipeError(UsageError, ValueError):
    """A recipe that cannot be read or translated; the message is ``RECIPE:LINE: what``."""


@dataclass(frozen=True, eq=False)
class _NodeBase:
    index: int  # the instruction's result index (``&index``)
    line: int  # 1-based line in the recipe file


@dataclass(frozen=True, eq=False)
class ModelNode(_NodeBase):
    """``model "path" ...``: a checkpoint loaded from ``path`` (as written, escapes undone)."""

    path: str
    config: Optional[str] = None  # legacy: the architecture ("sdxl"); 0.1.0: model_config ("sdxl-sgm")
    kind: Optional[str] = None  # legacy: the model type ("base"); 0.1.0: merge_space ("weight")


@dataclass(frozen=True, eq=False)
class MergeNode(_NodeBase):
    """``merge "method" args... key=value...``."""

    method: str
    args: Tuple[Value, ...] = ()
    kwargs: Dict[str, Value] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class DictNode(_NodeBase):
    """``dict key=value ...`` (per-key or per-block hyperparameters)."""

    entries: Dict[str, Value] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class LiteralNode(_NodeBase):
    """``literal VALUE key=value ...`` (0.1.0): a constant state dict."""

    value: Value = None
    kwargs: Dict[str, Value] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ParameterNode(_NodeBase):
    """``parameter "name" "SPACE" ...`` (legacy): a placeholder filled in at merge time."""

    name: str = ""
    args: Tuple[Value, ...] = ()


Node = Union[ModelNode, MergeNode, DictNode, LiteralNode, ParameterNode]
Value = Union[Node, str, int, float, bool, None]


@dataclass(frozen=True)
class MechaRecipe:
    """A parsed recipe: its instructions in order; the last one is the result."""

    source: str  # the recipe's path as the user gave it (starts every message)
    version: Optional[str]  # "0.1.0", or None for the legacy format (no header)
    nodes: Tuple[Node, ...]
    bool_constants: bool = False  # some value was written as true/false (sd-mecha >= 4b8b88d)

    @property
    def root(self) -> Node:
        return self.nodes[-1]

    def error(self, line: int, what: str) -> MechaRecipeError:
        """The one-line error for ``what`` at ``line``."""
        return MechaRecipeError(f"{printable(self.source)}:{line}: {what}")


class _LineError(Exception):
    """What is wrong with the current line (the parser adds the file and line number)."""


def _tokenize(text: str, escapes: bool) -> List[str]:
    """sd-mecha's tokenizer: split on spaces outside quotes; a quoted part keeps its quotes and
    anything glued before it (``key="v"``). ``escapes``: a backslash takes the next character
    literally (0.1.0); in the legacy format backslashes are ordinary characters."""
    tokens: List[str] = []
    current: List[str] = []
    prefix: List[str] = []
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif escapes and char == "\\":
            escaped = True
            continue
        elif char == '"':
            quoted = not quoted
            if quoted:
                prefix, current = current, []
            else:
                tokens.append("".join(prefix) + '"' + "".join(current) + '"')
                prefix, current = [], []
            continue
        elif char in " \t" and not quoted:
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(char)
    if escaped:
        raise _LineError("a backslash ends the line")
    if quoted:
        raise _LineError("unterminated quoted string")
    if current:
        tokens.append("".join(current))
    return tokens


class _Parser:
    def __init__(self, source: str, version: Optional[str]) -> None:
        self.source = source
        self.version = version
        self.nodes: List[Node] = []
        self.bool_constants = False

    def value(self, token: str, where: str) -> Value:
        if token in _CONSTANTS:
            if token != "null":
                self.bool_constants = True
            return _CONSTANTS[token]
        if token.startswith("&"):
            try:
                index = int(token[1:])
            except ValueError:
                raise _LineError(f"{where}: {token!r} is not a reference (&N)") from None
            if not 0 <= index < len(self.nodes):
                raise _LineError(
                    f"{where}: reference {token} out of bounds (only &0..&{len(self.nodes) - 1} come before this line)"
                    if self.nodes
                    else f"{where}: reference {token} out of bounds (no instruction comes before this line)"
                )
            return self.nodes[index]
        if len(token) >= 2 and token.startswith('"') and token.endswith('"'):
            return token[1:-1]
        try:
            return float(token) if ("." in token or "e" in token.lower()) else int(token)
        except ValueError:
            raise _LineError(f"{where}: {printable(token)!r} is not a number, string, reference (&N) or true/false/null") from None

    def arguments(self, tokens: Sequence[str]) -> Tuple[List[Value], Dict[str, Value]]:
        args: List[Value] = []
        kwargs: Dict[str, Value] = {}
        for position, token in enumerate(tokens, 1):
            key, eq, raw = token.partition("=")
            if eq and not token.startswith('"'):
                if not key.isidentifier():
                    raise _LineError(f"argument {position}: {printable(key)!r} is not a parameter name")
                if key in kwargs:
                    raise _LineError(f"argument {position}: {key} given twice")
                kwargs[key] = self.value(raw, f"argument {position} ({key})")
            else:
                if kwargs:
                    raise _LineError(f"argument {position}: a positional value after key=value arguments")
                args.append(self.value(token, f"argument {position}"))
        return args, kwargs

    def instruction(self, line: int, text: str) -> None:
        tokens = _tokenize(text, escapes=self.version is not None)
        command, rest = tokens[0], tokens[1:]
        args, kwargs = self.arguments(rest)
        index = len(self.nodes)
        node: Node
        if command == "model":
            node = self._model(index, line, args, kwargs)
        elif command == "merge":
            if not args or not isinstance(args[0], str):
                raise _LineError('merge: the method name must come first, quoted (merge "weighted_sum" ...)')
            node = MergeNode(index, line, args[0], tuple(args[1:]), kwargs)
        elif command == "dict":
            if args:
                raise _LineError("dict: entries must be key=value")
            node = DictNode(index, line, kwargs)
        elif command == "literal" and self.version is not None:
            if len(args) != 1:
                raise _LineError("literal: exactly one value expected")
            node = LiteralNode(index, line, args[0], kwargs)
        elif command == "parameter" and self.version is None:
            if not args or not isinstance(args[0], str):
                raise _LineError('parameter: the name must come first, quoted (parameter "alpha" "BASE")')
            node = ParameterNode(index, line, args[0], tuple(args[1:]))
        else:
            known = "model, merge, dict, literal" if self.version is not None else "model, merge, dict, parameter"
            fmt = f"version {self.version}" if self.version is not None else "legacy (no version line)"
            raise _LineError(f"unknown command {printable(command)!r} in a {fmt} recipe (known: {known})")
        self.nodes.append(node)

    def _model(self, index: int, line: int, args: List[Value], kwargs: Dict[str, Value]) -> ModelNode:
        names = ("model_config", "merge_space") if self.version is not None else ("model_arch", "model_type")
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise _LineError(f"model: unknown argument {unknown[0]} (known: {', '.join(names)})")
        if not args or not isinstance(args[0], str):
            raise _LineError('model: the path must come first, quoted (model "models/a.safetensors" ...)')
        if len(args) > 3:
            raise _LineError(f"model: at most 3 values expected (path, {', '.join(names)}), got {len(args)}")
        extra: List[Optional[str]] = []
        for position, name in enumerate(names, 1):
            if position < len(args) and name in kwargs:
                raise _LineError(f"model: {name} given twice")
            value = args[position] if position < len(args) else kwargs.get(name)
            if value is not None and not isinstance(value, str):
                raise _LineError(f"model: {name} must be a quoted string or null")
            extra.append(value)
        if not args[0]:
            raise _LineError("model: empty path")
        return ModelNode(index, line, args[0], extra[0], extra[1])


def parse_recipe(text: str, source: str = "recipe.mecha") -> MechaRecipe:
    """Parse the text of a ``.mecha`` recipe (either format); :class:`MechaRecipeError` on the
    first bad line."""
    lines = text.splitlines()
    first = next((i for i, t in enumerate(lines) if t.strip()), None)
    if first is None:
        raise MechaRecipeError(f"{printable(source)}:1: empty recipe (no instructions)")
    version: Optional[str] = None
    start = 0
    head = lines[first].strip()
    if head.split(" ", 1)[0] == "version":
        version = head[len("version"):].strip()
        if version not in FORMAT_VERSIONS:
            raise MechaRecipeError(
                f"{printable(source)}:{first + 1}: unsupported recipe format version {printable(version)!r} "
                f"(known: {', '.join(FORMAT_VERSIONS)}, or the legacy format without a version line)"
            )
        start = first + 1
    parser = _Parser(source, version)
    for number, raw in enumerate(lines[start:], start + 1):
        text_line = raw.strip()
        if not text_line or text_line.startswith("#"):
            continue
        if text_line.split(" ", 1)[0] == "version":
            raise MechaRecipeError(f"{printable(source)}:{number}: a version line must be the first line")
        try:
            parser.instruction(number, text_line)
        except _LineError as e:
            raise MechaRecipeError(f"{printable(source)}:{number}: {e}") from None
    if not parser.nodes:
        raise MechaRecipeError(f"{printable(source)}:{len(lines)}: no instructions (only a version line and comments)")
    return MechaRecipe(source=source, version=version, nodes=tuple(parser.nodes), bool_constants=parser.bool_constants)


def read_recipe(path: Union[str, os.PathLike[str]]) -> MechaRecipe:
    """Read and parse a ``.mecha`` file (UTF-8)."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MechaRecipeError(f"{printable(source)}: cannot read the recipe: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MechaRecipeError(f"{printable(source)}:{line}: not UTF-8 text (byte {e.start})") from None
    return parse_recipe(text, source)
