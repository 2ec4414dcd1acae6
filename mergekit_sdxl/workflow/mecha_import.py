"""Translate a parsed sd-mecha recipe (:mod:`~mergekit_sdxl.workflow.mecha_recipe`) into one
mergekit config for this plugin, with every model load resolved under a folder.

What translates (sd-mecha's own definitions, ljleb/sd-mecha ``merge_methods``):

* ``subtract``, ``add_difference``, ``weighted_sum``, ``n_average`` are linear: any combination of
  them folds into sum_i c_i x model_i. With sum c_i = 1 it becomes mergekit ``linear`` (weights c_i,
  no normalisation) or, when the recipe subtracts a model, ``task_arithmetic`` on that model as the
  base (weights c_i of the others). ``weighted_sum`` with ``alpha`` 0 or 1 picks one side, whatever
  the other side is.
* ``ties_sum_with_dropout`` / ``ties_sum_extended`` / ``ties_sum`` over task vectors
  ``subtract(model_i, B)`` and added back with ``add_difference(B, ..., alpha)`` become ``tgmd``
  (``dgmla`` when ``della_eps`` is not 0), each sd-mecha parameter mapped onto the plugin's.
* ``geometric_median`` of models, or of task vectors added back with ``alpha`` 1 (the geometric
  median commutes with the shift), becomes ``geometric_median``.
* ``fallback(pick_component(M, "vae"), X)`` becomes ``sdxl: {vae: {source: M}}``.

The meaning of ``vote_sgn`` (and of ``apply_stock``) flipped in sd-mecha commit 4b8b88d
(2025-01-23, first released in 0.1.0rc1 on 2025-02-03): before it ``vote_sgn > 0`` elected signs
by head count (``sign_election: count``), after it ``vote_sgn = true`` elects by the sum of the
task vectors (``sign_election: sum``). ``vote_semantics`` ``"2024"`` / ``"2025"`` picks the reading;
without it the recipe's content decides where it can (see :func:`infer_vote_semantics`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

from mergekit_sdxl.errors import UserError
from mergekit_sdxl.io.discover import discover_safetensors
from mergekit_sdxl.method_versions import METHOD_VERSIONS as _METHOD_VERSIONS
from mergekit_sdxl.method_versions import format_method_versions, method_versions
from mergekit_sdxl.text import printable
from mergekit_sdxl.workflow.mecha_recipe import (
    DictNode,
    LiteralNode,
    MechaRecipe,
    MechaRecipeError,
    MergeNode,
    ModelNode,
    Node,
    ParameterNode,
    Value,
    read_recipe,
)
from mergekit_sdxl.workflow.recipe import RECIPE_HEADER, _comment, _yaml_scalar, _yaml_str

logger = logging.getLogger(__name__)

__all__ = [
    "VOTE_SEMANTICS",
    "METHOD_VERSIONS",
    "MechaImport",
    "MissingInputsError",
    "ResolvedModel",
    "import_mecha",
    "infer_vote_semantics",
    "translate_recipe",
]

VOTE_SEMANTICS = ("2024", "2025")

# The version of each method's meaning (the one table, mergekit_sdxl/method_versions.py), re-exported.
METHOD_VERSIONS = _METHOD_VERSIONS

_VOTE_CHANGE = "sd-mecha commit 4b8b88d (2025-01-23, released in 0.1.0rc1 on 2025-02-03)"
_TIES_METHODS = ("ties_sum_with_dropout", "ties_sum_extended", "ties_sum")
_TIES_PARAMETERS: Dict[str, Tuple[str, ...]] = {
    "ties_sum_with_dropout": (
        "probability", "della_eps", "rescale", "no_rescale", "k", "vote_sgn", "apply_stock", "cos_eps",
        "apply_median", "eps", "maxiter", "ftol", "seed",
    ),
    "ties_sum_extended": ("k", "vote_sgn", "apply_stock", "cos_eps", "apply_median", "eps", "maxiter", "ftol"),
    "ties_sum": ("k", "vote_sgn"),
}
# Methods of two inputs whose third positional value is ``alpha`` (0.1.0 writes it positionally).
_ALPHA_DEFAULTS = {"weighted_sum": 0.5, "add_difference": 1.0}
_SUPPORTED = (
    "subtract", "add_difference", "weighted_sum", "n_average", *_TIES_METHODS, "geometric_median",
    "pick_component", "fallback",
)
_TOL = 1e-12


class MissingInputsError(UserError):
    """Some of the recipe's models are not under the models folder (``missing`` lists them)."""

    def __init__(self, message: str, missing: Sequence[ResolvedModel]) -> None:
        super().__init__(message)
        self.missing = list(missing)


@dataclass(frozen=True)
class ResolvedModel:
    """One model load of the recipe and the file it was matched to."""

    written: str  # the path as the recipe writes it
    line: int  # its ``model`` line
    path: str  # the matched file (absolute), or the placeholder DIR/written when not found
    found: bool


@dataclass
class MechaImport:
    """The translated config and what the translation decided."""

    method: str
    base: Optional[ResolvedModel]
    models: List[ResolvedModel]
    parameters: Dict[str, Any]
    model_parameters: List[Dict[str, Any]]  # per entry of ``models`` (weights of linear methods)
    vae_source: Optional[ResolvedModel]
    vote_semantics: Optional[str]  # None: no method of the recipe depends on it
    vote_reason: str
    notes: List[str]  # the translation, parameter by parameter, and its known differences
    yaml_text: str = ""

    @property
    def missing(self) -> List[ResolvedModel]:
        inputs = ([self.base] if self.base else []) + self.models + ([self.vae_source] if self.vae_source else [])
        return [m for m in inputs if not m.found]

    def summary_lines(self) -> List[str]:
        base = f" + base {printable(self.base.written)}" if self.base else ""
        lines = [f"{self.method} over {len(self.models)} models{base}"]
        if self.vote_semantics:
            lines.append(f"vote semantics {self.vote_semantics}: {self.vote_reason}")
        if self.vae_source:
            lines.append(f"VAE from {printable(self.vae_source.written)}")
        for m in self.missing:
            lines.append(f"  not found: {printable(m.written)} (line {m.line})")
        return lines


# --------------------------------------------------------------------------- vote semantics


def _ties_nodes(recipe: MechaRecipe) -> List[MergeNode]:
    return [n for n in recipe.nodes if isinstance(n, MergeNode) and n.method in _TIES_METHODS]


def infer_vote_semantics(recipe: MechaRecipe) -> Tuple[Optional[str], str]:
    """``(semantics, why)`` from the recipe's content; ``(None, why)`` when it cannot tell.

    * ``true`` / ``false`` anywhere: only serializers from 4b8b88d on write them -> 2025.
    * no version line (legacy format): written by sd-mecha 0.0.x, all before 4b8b88d -> 2024.
    * ``version 0.1.0`` with ``vote_sgn`` / ``apply_stock`` absent: 2025 (every release that writes
      the header has the new meaning; only unreleased commits of 2024-12-30..2025-01-22 did not).
    * ``version 0.1.0`` with a numeric ``vote_sgn`` / ``apply_stock``: undecidable.
    """
    if recipe.bool_constants:
        return "2025", "the recipe writes true/false, which only sd-mecha from 4b8b88d on writes"
    if recipe.version is None:
        return "2024", "legacy format (no version line): written by sd-mecha 0.0.x, before the change in 4b8b88d"
    numeric = [
        f"line {n.line}: {k}={n.kwargs[k]}"
        for n in _ties_nodes(recipe)
        for k in ("vote_sgn", "apply_stock")
        if isinstance(n.kwargs.get(k), (int, float)) and not isinstance(n.kwargs.get(k), bool)
    ]
    if numeric:
        return None, (
            f"a version {recipe.version} recipe with numeric flags ({numeric[0]}): sd-mecha wrote that both before "
            f"and after {_VOTE_CHANGE}"
        )
    return "2025", f"format version {recipe.version}: every sd-mecha release writing it has the meaning of 4b8b88d"


# --------------------------------------------------------------------------- expressions


@dataclass
class _Lin:
    """sum_i c_i x model_i (a checkpoint when the sum of c is 1, a difference when it is 0)."""

    coeffs: Dict[str, float]
    subtrahends: List[str] = field(default_factory=list)  # models subtracted, in order

    @property
    def total(self) -> float:
        return sum(self.coeffs.values())

    def single(self) -> Optional[str]:
        """The model when this is exactly one model."""
        if len(self.coeffs) == 1:
            (key, c), = self.coeffs.items()
            return key if c == 1.0 else None
        return None

    def plus(self, other: _Lin, scale: float = 1.0, own: float = 1.0) -> _Lin:
        out: Dict[str, float] = {k: own * c for k, c in self.coeffs.items()}
        for k, c in other.coeffs.items():
            out[k] = out.get(k, 0.0) + scale * c
        return _Lin({k: c for k, c in out.items() if c != 0.0}, self.subtrahends + other.subtrahends)


@dataclass
class _Deltas:
    """The merged task vector of a task-vector method, to be added back onto ``base``."""

    method: str  # tgmd, dgmla or geometric_median
    base: str
    models: List[str]
    zero_lines: List[int]  # subtract(B, B) lines: the base listed as a point
    parameters: Dict[str, Any]
    notes: List[str]
    node: MergeNode


@dataclass
class _Plan:
    """A whole mergekit merge."""

    method: str
    base: Optional[str]
    models: List[str]
    model_parameters: List[Dict[str, Any]]
    parameters: Dict[str, Any]
    notes: List[str]
    vae: Optional[str] = None


@dataclass
class _Component:
    model: str
    component: str


@dataclass
class _WithVae:
    inner: _Expr
    vae: str


_Expr = Union[_Lin, _Deltas, _Plan, _Component, _WithVae]


@dataclass
class _Failed:
    """A node whose translation failed: raised when a result needs it."""

    error: MechaRecipeError


def _show(v: Value) -> str:
    """A value as the recipe writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, str):
        return printable(f'"{v}"')
    if isinstance(v, (int, float)):
        return repr(v)
    return f"&{v.index}"


def _fmt(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else f"{float(v):.1f}"


class _Translator:
    def __init__(self, recipe: MechaRecipe, semantics: Optional[str], vote_reason: str) -> None:
        self.recipe = recipe
        self.semantics = semantics
        self.vote_reason = vote_reason
        self.models: Dict[str, ModelNode] = {}  # model key -> its first model line
        self.done: Dict[int, Union[_Expr, _Failed]] = {}

    def error(self, node: Node, what: str) -> MechaRecipeError:
        return self.recipe.error(node.line, what)

    # ---- model lines
    def model(self, node: ModelNode) -> _Lin:
        if self.recipe.version is None:
            if node.config not in (None, "sdxl") or node.kind not in (None, "base"):
                raise self.error(node, f'model {printable(node.path)!r} is "{node.config}" "{node.kind}": only full SDXL '
                                 'checkpoints ("sdxl" "base") can be imported')
        elif node.config not in (None, "sdxl-sgm") or node.kind not in (None, "weight"):
            raise self.error(node, f"model {printable(node.path)!r} has model_config={node.config} merge_space={node.kind}: "
                             'only full SDXL checkpoints (model_config="sdxl-sgm" merge_space="weight") can be imported')
        key = node.path
        self.models.setdefault(key, node)
        return _Lin({key: 1.0})

    # ---- evaluation
    def evaluate(self) -> _Expr:
        """Every node the result depends on, in line order (no recursion: chains can be long).
        A node that cannot be translated fails only when something uses it (the side that
        ``weighted_sum`` at alpha 0 or 1 drops is never needed)."""
        for node in self._reachable(self.recipe.root):
            try:
                self.done[node.index] = self._one(node)
            except MechaRecipeError as error:
                self.done[node.index] = _Failed(error)
        return self.result(self.recipe.root)

    def result(self, node: Node) -> _Expr:
        e = self.done[node.index]
        if isinstance(e, _Failed):
            raise e.error
        return e

    def _reachable(self, root: Node) -> List[Node]:
        seen: Set[int] = set()
        stack: List[Node] = [root]
        found: List[Node] = []
        while stack:
            node = stack.pop()
            if node.index in seen:
                continue
            seen.add(node.index)
            found.append(node)
            children: Sequence[Value] = ()
            if isinstance(node, MergeNode):
                children = (*node.args, *node.kwargs.values())
            stack.extend(c for c in children if isinstance(c, (ModelNode, MergeNode, DictNode, LiteralNode, ParameterNode)))
        return sorted(found, key=lambda n: n.index)

    def _one(self, node: Node) -> _Expr:
        if isinstance(node, ModelNode):
            return self.model(node)
        if isinstance(node, MergeNode):
            handler = _HANDLERS.get(node.method)
            if handler is None:
                raise self.error(node, f"merge method {printable(node.method)!r} cannot be imported (supported: {', '.join(_SUPPORTED)})")
            return handler(self, node)
        # dict / literal / parameter: only meaningful as per-key values, checked where used
        return _Lin({})

    def expr(self, node: MergeNode, value: Value, what: str) -> _Expr:
        if isinstance(value, (DictNode, LiteralNode, ParameterNode)):
            kind = type(value).__name__.replace("Node", "").lower()
            raise self.error(node, f"{node.method}: {what} is a {kind} (line {value.line}): not supported by the importer")
        if not isinstance(value, (ModelNode, MergeNode)):
            raise self.error(node, f"{node.method}: {what} must be a model or a merge (&N), got {_show(value)}")
        return self.result(value)

    def lin(self, node: MergeNode, value: Value, what: str) -> _Lin:
        e = self.expr(node, value, what)
        if isinstance(e, _Lin):
            return e
        raise self.error(node, f"{node.method}: {what} (&{getattr(value, 'index', '?')}) is the result of a non-linear merge; "
                         "that combination is not expressible as one mergekit config")

    def number(self, node: MergeNode, name: str, value: Value) -> float:
        if isinstance(value, (DictNode, LiteralNode, ParameterNode)):
            raise self.error(node, f"{node.method}: {name} is a per-key/per-block value (line {value.line}): not supported by the importer")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(node, f"{node.method}: {name}={_show(value)} must be a finite number")
        return float(value)

    def flag(self, node: MergeNode, name: str, value: Value) -> bool:
        """A switch as the chosen sd-mecha reads it: 2024 ``> 0.0``; 2025 Python truth."""
        if isinstance(value, bool):
            return value
        number = self.number(node, name, value)
        return number > 0.0 if self.semantics == "2024" else number != 0.0

    # ---- fixed-arity helpers
    def inputs_alpha(self, node: MergeNode, n_inputs: int) -> Tuple[List[Value], Optional[Value]]:
        """``n_inputs`` inputs then, for weighted_sum / add_difference, ``alpha`` (positional or key)."""
        names = {"alpha"} if node.method in _ALPHA_DEFAULTS else set()
        unknown = sorted(set(node.kwargs) - names)
        if unknown:
            known = ", ".join(sorted(names)) or "none"
            raise self.error(node, f"{node.method}: unknown parameter {unknown[0]} (known: {known})")
        args = list(node.args)
        limit = n_inputs + len(names)
        if not n_inputs <= len(args) <= limit:
            raise self.error(node, f"{node.method}: {n_inputs} inputs expected, got {len(args)} values")
        alpha = node.kwargs.get("alpha")
        if len(args) > n_inputs:
            if "alpha" in node.kwargs:
                raise self.error(node, f"{node.method}: alpha given twice")
            alpha = args[n_inputs]
        return args[:n_inputs], alpha


def _alpha(t: _Translator, node: MergeNode, alpha: Value) -> float:
    if alpha is not None:
        return t.number(node, "alpha", alpha)
    if node.method == "add_difference" and t.recipe.version is None:
        raise t.error(node, "add_difference: alpha absent, and its default changed in sd-mecha 0.0.x "
                      "(0.5 before 2024-06-18, 1.0 after): write alpha= in the recipe")
    return _ALPHA_DEFAULTS[node.method]


def _subtract(t: _Translator, node: MergeNode) -> _Expr:
    (a, b), _ = t.inputs_alpha(node, 2)
    la, lb = t.lin(node, a, "a"), t.lin(node, b, "b")
    out = la.plus(lb, scale=-1.0)
    single = lb.single()
    if single is not None:
        out.subtrahends.append(single)
    return out


def _weighted_sum(t: _Translator, node: MergeNode) -> _Expr:
    (a, b), alpha_v = t.inputs_alpha(node, 2)
    alpha = _alpha(t, node, alpha_v)
    # sd-mecha returns the side itself at alpha 0 / 1 ((1 - 1) * a + 1 * b = b for finite a).
    if alpha == 0.0:
        return t.expr(node, a, "a")
    if alpha == 1.0:
        return t.expr(node, b, "b")
    return t.lin(node, a, "a").plus(t.lin(node, b, "b"), scale=alpha, own=1.0 - alpha)


def _n_average(t: _Translator, node: MergeNode) -> _Expr:
    if node.kwargs:
        raise t.error(node, f"n_average: unknown parameter {sorted(node.kwargs)[0]} (it takes none)")
    if not node.args:
        raise t.error(node, "n_average: no inputs")
    out = _Lin({})
    for i, v in enumerate(node.args):
        out = out.plus(t.lin(node, v, f"input {i + 1}"), scale=1.0 / len(node.args))
    return out


def _add_difference(t: _Translator, node: MergeNode) -> _Expr:
    (a, b), alpha_v = t.inputs_alpha(node, 2)
    alpha = _alpha(t, node, alpha_v)
    ea, eb = t.expr(node, a, "a"), t.expr(node, b, "b")
    if alpha == 0.0:
        return ea
    if isinstance(ea, _Lin) and isinstance(eb, _Lin):
        return ea.plus(eb, scale=alpha)
    if isinstance(ea, _Lin) and isinstance(eb, _Deltas):
        base = ea.single()
        if base != eb.base:
            raise t.error(node, f"add_difference: the task vectors of line {eb.node.line} are relative to "
                          f"{printable(eb.base)!r} but are added to another model: not expressible as one mergekit config")
        return _plan_from_deltas(t, node, eb, alpha)
    raise t.error(node, "add_difference: this combination of merges is not expressible as one mergekit config")


def _plan_from_deltas(t: _Translator, node: MergeNode, d: _Deltas, alpha: float) -> _Plan:
    notes = list(d.notes)
    if d.method == "geometric_median":
        if alpha != 1.0:
            raise t.error(node, f"add_difference: alpha={alpha} on a geometric median of task vectors: only alpha 1 "
                          "(the plain geometric median of the models) is expressible")
        models = list(d.models) + ([d.base] if d.zero_lines else [])
        notes.append(f"add_difference (line {node.line}) with alpha 1 of a geometric median of task vectors = the "
                     "geometric median of the models" + (" (the base is one of the points)" if d.zero_lines else ""))
        return _Plan("geometric_median", None, models, [{} for _ in models], d.parameters, notes)
    params = dict(d.parameters)
    params["lambda"] = alpha
    params["seed"] = params.pop("seed")  # keep seed last, as the reference config writes it
    notes.append(f"add_difference (line {node.line}) alpha={_fmt(alpha)} -> lambda: {_fmt(alpha)}")
    if d.zero_lines:
        notes.append(
            f"the recipe also has a zero task vector among the inputs (a model minus itself, line "
            f"{d.zero_lines[0]}: the base as a point), one more point of sd-mecha's median; mergekit-sdxl's "
            f"{d.method} never takes the base as a point, so it runs over the {len(d.models)} other models"
        )
    return _Plan(d.method, d.base, list(d.models), [{} for _ in d.models], params, notes)


def _task_vectors(t: _Translator, node: MergeNode) -> Tuple[str, List[str], List[int]]:
    """(base, models, lines of zero vectors) of a task-vector method's inputs."""
    bases: List[str] = []
    models: List[str] = []
    zeros: List[int] = []
    for i, v in enumerate(node.args):
        if not isinstance(v, (ModelNode, MergeNode, DictNode, LiteralNode, ParameterNode)):
            raise t.error(node, f"{node.method}: positional value {_show(v)}: parameters are key=value")
        d = t.lin(node, v, f"input {i + 1}")
        pos = [k for k, c in d.coeffs.items() if c == 1.0]
        neg = [k for k, c in d.coeffs.items() if c == -1.0]
        line = getattr(v, "line", node.line)
        if not d.coeffs:  # a model minus itself: a zero task vector, still a point of the median
            zeros.append(line)
            continue
        if len(d.coeffs) != 2 or len(pos) != 1 or len(neg) != 1:
            raise t.error(node, f"{node.method}: input {i + 1} (line {line}) is not a task vector (a model minus the base)")
        models.append(pos[0])
        bases.append(neg[0])
    distinct = list(dict.fromkeys(bases))
    if len(distinct) != 1 or not models:
        what = "no task vector" if not models else f"task vectors relative to {len(distinct)} different models"
        raise t.error(node, f"{node.method}: {what}; one common base is needed")
    dup = next((m for i, m in enumerate(models) if m in models[:i]), None)
    if dup is not None:
        raise t.error(node, f"{node.method}: model {printable(dup)!r} is listed twice")
    return distinct[0], models, zeros


def _ties(t: _Translator, node: MergeNode) -> _Expr:
    if t.semantics is None:
        raise t.error(node, f"{node.method}: cannot tell which sd-mecha wrote this recipe ({t.vote_reason}); "
                      "vote_sgn changed meaning in " + _VOTE_CHANGE + ": pass --vote-semantics 2024 or 2025")
    known = _TIES_PARAMETERS[node.method]
    unknown = sorted(set(node.kwargs) - set(known))
    if unknown:
        raise t.error(node, f"{node.method}: unknown parameter {unknown[0]} (known: {', '.join(known)})")
    base, models, zeros = _task_vectors(t, node)
    kw = node.kwargs
    notes: List[str] = []
    out: Dict[str, Any] = {}

    def given(name: str) -> bool:
        return name in kw

    # drop
    dropout = node.method == "ties_sum_with_dropout"
    della = 0.0
    if dropout:
        p = t.number(node, "probability", kw["probability"]) if given("probability") else 0.9
        if not 0.0 <= p <= 1.0:
            raise t.error(node, f"{node.method}: probability={p} must be in [0, 1]")
        notes.append(f"probability={_fmt(p)} -> drop_rate: {_fmt(p)}" + ("" if given("probability") else " (sd-mecha's default)"))
        if given("della_eps"):
            della = t.number(node, "della_eps", kw["della_eps"])
        rescale = _rescale(t, node, notes)
    else:
        p, rescale = 0.0, 0.0
        notes.append(f"{node.method} does not drop: drop_rate: 0.0")
    method = "dgmla" if della != 0.0 else "tgmd"
    if method == "dgmla":
        out["drop_method"] = "della"
        notes.append(f"della_eps={_fmt(della)} -> dgmla, drop_method: della, epsilon: {_fmt(della)}")
    out["drop_rate"] = p
    if method == "dgmla":
        out["epsilon"] = della
    # trim
    if given("k"):
        k = t.number(node, "k", kw["k"])
    elif node.method == "ties_sum" and t.semantics == "2025":
        raise t.error(node, "ties_sum: k absent, and its default changed in sd-mecha 2025 (0.2 in 0.1.0rc1-rc6, "
                      "1.0 from 0.1.0): write k= in the recipe")
    else:
        k = 0.2
    if not 0.0 < k <= 1.0:
        raise t.error(node, f"{node.method}: k={k} must be in (0, 1]")
    out["density"] = k
    notes.append(f"k={_fmt(k)} -> density: {_fmt(k)}" + ("" if given("k") else " (sd-mecha's default)"))
    if k < 1.0:
        notes.append("sd-mecha's top-k keeps the entries at or above the int((1-k) n)-th smallest magnitude, "
                     "one entry more than mergekit-sdxl's floor(k n) (plus ties)")
    out["rescale"] = rescale
    # vote
    if given("vote_sgn"):
        on = t.flag(node, "vote_sgn", kw["vote_sgn"])
        vote = ("count" if on else "sum") if t.semantics == "2024" else ("sum" if on else "count")
        notes.append(f"vote_sgn={_show(kw['vote_sgn'])} read with {t.semantics} semantics -> sign_election: {vote}")
    else:
        vote = "sum" if t.semantics == "2024" else "count"
        notes.append(f"vote_sgn absent: its {t.semantics} default -> sign_election: {vote}")
    out["sign_election"] = vote
    # aggregate
    median = t.flag(node, "apply_median", kw["apply_median"]) if given("apply_median") else False
    if node.method != "ties_sum":
        if given("apply_stock"):
            s = t.flag(node, "apply_stock", kw["apply_stock"])
            stock = s if t.semantics == "2024" else not s
        else:
            stock = t.semantics == "2025"  # 2025: apply_stock=false (the default) turns Model Stock on
        if stock and not median:
            raise t.error(node, f"{node.method}: this applies Model Stock to the TIES mean (apply_stock, read with "
                          f"{t.semantics} semantics): mergekit-sdxl has no TIES + Model Stock aggregate")
    out["aggregate"] = "median" if median else "mean"
    shown = _show(kw["apply_median"]) if given("apply_median") else "absent"
    notes.append(f"apply_median={shown} -> aggregate: {out['aggregate']}")
    if median and (given("apply_stock") or given("cos_eps")):
        notes.append("apply_stock and cos_eps have no effect with apply_median")
    for name, default, kind in (("eps", 1e-6, float), ("maxiter", 100, int), ("ftol", 1e-20, float)):
        if node.method == "ties_sum":
            out[name] = default
            continue
        v = t.number(node, name, kw[name]) if given(name) else float(default)
        if kind is int:
            if v < 0 or v != round(v):
                raise t.error(node, f"{node.method}: maxiter={v} must be a whole number >= 0")
            out[name] = int(round(v))
        else:
            if v < 0 or (name == "eps" and v == 0):
                raise t.error(node, f"{node.method}: {name}={v} must be {'> 0' if name == 'eps' else '>= 0'}")
            out[name] = v
    seed_v = kw.get("seed")
    if seed_v is None or (isinstance(seed_v, (int, float)) and not isinstance(seed_v, bool) and seed_v < 0):
        out["seed"] = 0
        if dropout:
            notes.append("no seed (sd-mecha drew fresh random masks): seed: 0")
    else:
        seed_f = t.number(node, "seed", seed_v)
        if seed_f != round(seed_f):
            raise t.error(node, f"{node.method}: seed={seed_f} must be a whole number")
        out["seed"] = int(round(seed_f))
    if dropout:
        notes.append(f"seed={out['seed']}: mergekit-sdxl's masks are counter-based (seed, key, model path, element), "
                     "not sd-mecha's torch generator: the same drop statistics, not the same bits")
    return _Deltas(method, base, models, zeros, out, [f"{node.method} (line {node.line}) -> {method}", *notes], node)


def _rescale(t: _Translator, node: MergeNode, notes: List[str]) -> float:
    kw = node.kwargs
    if "rescale" in kw and "no_rescale" in kw:
        raise t.error(node, f"{node.method}: rescale and no_rescale both given")
    if "no_rescale" in kw:
        off = t.flag(node, "no_rescale", kw["no_rescale"])
        value = 0.0 if off else 1.0
        notes.append(f"no_rescale={_show(kw['no_rescale'])} -> rescale: {_fmt(value)}")
        return value
    if "rescale" not in kw:
        notes.append("rescale absent: sd-mecha's default (survivors / (1 - p)) -> rescale: 1.0")
        return 1.0
    raw = kw["rescale"]
    if isinstance(raw, bool):
        value = 1.0 if raw else 0.0
    else:
        value = t.number(node, "rescale", raw)
        if t.semantics == "2025" and value not in (0.0, 1.0):
            raise t.error(node, f"{node.method}: rescale={value}: sd-mecha 2025 releases read it as an exponent "
                          "(float, until c2b3437) or as true (bool, after): write 0 or 1")
        if not 0.0 <= value <= 1.0:
            raise t.error(node, f"{node.method}: rescale={value} must be in [0, 1] (survivors x (1-p)^(-rescale))")
    notes.append(f"rescale={_show(raw)} -> rescale: {_fmt(value)}")
    return value


def _geometric_median(t: _Translator, node: MergeNode) -> _Expr:
    known = ("eps", "maxiter", "ftol")
    unknown = sorted(set(node.kwargs) - set(known))
    if unknown:
        raise t.error(node, f"geometric_median: unknown parameter {unknown[0]} (known: {', '.join(known)})")
    params: Dict[str, Any] = {}
    for name, default in (("eps", 1e-6), ("maxiter", 100), ("ftol", 1e-20)):
        v = t.number(node, name, node.kwargs[name]) if name in node.kwargs else float(default)
        params[name] = int(round(v)) if name == "maxiter" else v
    if params["maxiter"] < 0 or params["eps"] <= 0 or params["ftol"] < 0:
        raise t.error(node, "geometric_median: eps must be > 0, maxiter and ftol >= 0")
    inputs = [t.lin(node, v, f"input {i + 1}") for i, v in enumerate(node.args)]
    if not inputs:
        raise t.error(node, "geometric_median: no inputs")
    singles = [e.single() for e in inputs]
    notes = [f"geometric_median (line {node.line}) -> geometric_median, eps/maxiter/ftol as written"]
    if all(s is not None for s in singles):
        models = [s for s in singles if s is not None]
        return _Plan("geometric_median", None, models, [{} for _ in models], params, notes)
    base, models, zeros = _task_vectors(t, node)
    return _Deltas("geometric_median", base, models, zeros, params, notes, node)


def _pick_component(t: _Translator, node: MergeNode) -> _Expr:
    if node.kwargs or len(node.args) != 2 or not isinstance(node.args[1], str):
        raise t.error(node, 'pick_component: expected a model and a component name (pick_component &0 "vae")')
    model = t.lin(node, node.args[0], "a").single()
    if model is None or node.args[1] != "vae":
        raise t.error(node, 'pick_component: only the VAE of one model ("vae") can be imported, as the sdxl vae source')
    return _Component(model, node.args[1])


def _fallback(t: _Translator, node: MergeNode) -> _Expr:
    (a, default), _ = t.inputs_alpha(node, 2)
    ea, ed = t.expr(node, a, "a"), t.expr(node, default, "default")
    if not isinstance(ea, _Component):
        raise t.error(node, 'fallback: only fallback(pick_component(M, "vae"), merge) can be imported (the VAE of M)')
    if isinstance(ed, (_Component, _WithVae)):
        raise t.error(node, "fallback: one VAE source only")
    return _WithVae(ed, ea.model)


_HANDLERS: Dict[str, Callable[[_Translator, MergeNode], _Expr]] = {
    "subtract": _subtract,
    "weighted_sum": _weighted_sum,
    "n_average": _n_average,
    "add_difference": _add_difference,
    "ties_sum_with_dropout": _ties,
    "ties_sum_extended": _ties,
    "ties_sum": _ties,
    "geometric_median": _geometric_median,
    "pick_component": _pick_component,
    "fallback": _fallback,
}


def _finish(t: _Translator, e: _Expr) -> _Plan:
    root = t.recipe.root
    if isinstance(e, _WithVae):
        plan = _finish(t, e.inner)
        plan.vae = e.vae
        plan.notes.append(f"fallback(pick_component(..., \"vae\"), ...) (line {root.line}) -> sdxl: vae: source")
        return plan
    if isinstance(e, _Plan):
        return e
    if isinstance(e, _Deltas):
        raise t.error(root, "the recipe's result is a task vector (a difference), not a checkpoint: add it to a base "
                      "with add_difference")
    if isinstance(e, _Component):
        raise t.error(root, "the recipe's result is one component of a model, not a merge")
    return _linear_plan(t, e)


def _linear_plan(t: _Translator, e: _Lin) -> _Plan:
    root = t.recipe.root
    if abs(e.total - 1.0) > 1e-9:
        what = "a difference of models (a delta)" if abs(e.total) < 1e-9 else f"models whose coefficients sum to {e.total:g}"
        raise t.error(root, f"the recipe's result is {what}, not a checkpoint")
    single = e.single()
    if single is not None:
        raise t.error(root, f"the recipe's result is the model {printable(single)!r} itself: nothing to merge")
    models = [k for k, c in e.coeffs.items() if abs(c) > _TOL]
    if not e.subtrahends:
        notes = [f"weighted_sum / n_average (result at line {root.line}) -> linear with the folded weights, normalize: false"]
        return _Plan("linear", None, models, [{"weight": e.coeffs[m]} for m in models], {"normalize": False}, notes)
    counts: Dict[str, int] = {}
    for s in e.subtrahends:
        counts[s] = counts.get(s, 0) + 1
    base = max(counts, key=lambda k: (counts[k], -e.subtrahends.index(k)))
    others = [m for m in models if m != base]
    notes = [f"add_difference / subtract / weighted_sum (result at line {root.line}) -> task_arithmetic on the subtracted "
             f"model {printable(base)!r}: result = base + sum_i weight_i (model_i - base)"]
    return _Plan("task_arithmetic", base, others, [{"weight": e.coeffs[m]} for m in others],
                 {"normalize": False, "lambda": 1.0}, notes)


# --------------------------------------------------------------------------- model files


class _Finder:
    """Matches the recipe's model paths with files under the models folder."""

    def __init__(self, models_dir: Path, source: str) -> None:
        self.root = models_dir.resolve()
        self.source = source
        self._by_name: Optional[Dict[str, List[Path]]] = None

    def index(self) -> Dict[str, List[Path]]:
        if self._by_name is None:
            try:
                found = discover_safetensors(self.root)
            except OSError as e:
                raise UserError(f"--models-dir {printable(self.root)}: {e.strerror or 'not a directory'}") from None
            by_name: Dict[str, List[Path]] = {}
            for p in found.files:
                by_name.setdefault(p.name, []).append(p)
            self._by_name = by_name
        return self._by_name

    def find(self, node: ModelNode) -> ResolvedModel:
        written = node.path
        rel = written.replace("\\", "/")
        names = [rel]
        if rel.lower().endswith(".safetensors"):
            names.append(rel[: -len(".safetensors")])
        else:
            names.append(rel + ".safetensors")
        relative = not (rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"))
        if relative:
            for r in names:
                candidate = self.root / r
                if ".." not in Path(r).parts and candidate.is_file():
                    return ResolvedModel(written, node.line, str(candidate), True)
        wanted = [Path(r).name for r in names]
        index = self.index()
        for fold in (False, True):
            hits: List[Path] = []
            for name in wanted:
                if fold:
                    hits += [p for n, ps in index.items() if n.lower() == name.lower() for p in ps]
                else:
                    hits += index.get(name, [])
            hits = list(dict.fromkeys(hits))
            if len(hits) == 1:
                return ResolvedModel(written, node.line, str(hits[0]), True)
            if len(hits) > 1:
                listed = ", ".join(printable(h.relative_to(self.root).as_posix()) for h in hits[:4])
                raise MechaRecipeError(
                    f"{printable(self.source)}:{node.line}: model {printable(written)!r} matches {len(hits)} files under "
                    f"{printable(self.root)} ({listed}): keep one, or give a narrower --models-dir"
                )
        inside = relative and ".." not in Path(rel).parts
        placeholder = self.root / (rel if inside else Path(rel).name)
        return ResolvedModel(written, node.line, str(placeholder), False)


# --------------------------------------------------------------------------- rendering


def _render(imp: MechaImport, recipe: MechaRecipe, digest: str, command: Optional[str], models_dir: Path) -> str:
    fmt = f"version {recipe.version}" if recipe.version else "legacy format, no version line"
    head = [
        f"{RECIPE_HEADER} {imp.method} imported from sd-mecha recipe {Path(recipe.source).name} ({fmt})",
        f"generated by: {command}" if command else "generated by: mergekit-sdxl import-mecha",
        f"recipe sha256: {digest}",
        f"method_version: {format_method_versions(method_versions([imp.method]))}",
    ]
    if imp.vote_semantics:
        head.append(f"vote semantics: {imp.vote_semantics} ({imp.vote_reason})")
        head.append(
            "  vote_sgn changed meaning in " + _VOTE_CHANGE + ": before, vote_sgn > 0 = count vote; after, "
            "vote_sgn = true = sum vote (and apply_stock = false turns Model Stock on)"
        )
    head.append("translation:")
    head += [f"  {n}" for n in imp.notes]
    n_in = len(imp.models) + (1 if imp.base else 0)
    head.append(f"inputs: {len(imp.models)} models" + (" + base" if imp.base else "") + f", matched by file name under {models_dir}")
    if imp.missing:
        head.append(f"NOT FOUND ({len(imp.missing)} of {n_in}; written as placeholders, --allow-missing):")
        head += [f"  line {m.line}: {m.written}" for m in imp.missing]
    head.append("dtype / out_dtype: not in the recipe; the AstolfoMix-XL reference (float64 compute, float16 save)")
    head.append("merge with: mergekit-sdxl merge THIS.yaml OUT.safetensors")
    out = [f"# {_comment(line)}" for line in head]
    out.append("")
    out.append(f"merge_method: {imp.method}")
    if imp.base is not None:
        out.append(f"# line {imp.base.line}: {_comment(imp.base.written)}")
        out.append(f"base_model: {{model: {{path: {_yaml_str(imp.base.path)}}}}}")
    out.append("models:")
    for m, params in zip(imp.models, imp.model_parameters, strict=True):
        out.append(f"  # line {m.line}: {_comment(m.written)}")
        out.append(f"  - model: {{model: {{path: {_yaml_str(m.path)}}}}}")
        if params:
            out.append("    parameters: {" + ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in params.items()) + "}")
    out.append("parameters:")
    for k, v in imp.parameters.items():
        out.append(f"  {k}: {_yaml_scalar(v)}")
    out.append("dtype: float64")
    out.append("out_dtype: float16")
    out.append("sdxl:")
    # The pin: a mergekit-sdxl whose method no longer means this refuses the config.
    out.append(f"  method_version: {format_method_versions(method_versions([imp.method]))}")
    if imp.vae_source is not None:
        out.append("  vae:")
        out.append(f"    # line {imp.vae_source.line}: {_comment(imp.vae_source.written)}")
        out.append(f"    source: {_yaml_str(imp.vae_source.path)}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- entry points


def translate_recipe(
    recipe: MechaRecipe,
    models_dir: Union[str, os.PathLike[str]],
    *,
    vote_semantics: Optional[str] = None,
    digest: str = "",
    command: Optional[str] = None,
) -> MechaImport:
    """Translate a parsed recipe; model files are matched under ``models_dir`` (unmatched ones
    are placeholders, listed in ``missing``). :class:`MechaRecipeError` when the recipe uses
    something that has no exact counterpart, or its vote semantics cannot be told."""
    if vote_semantics is not None and vote_semantics not in VOTE_SEMANTICS:
        raise UserError(f"--vote-semantics {printable(vote_semantics)}: expected 2024 or 2025")
    inferred, why = infer_vote_semantics(recipe)
    if vote_semantics is not None:
        reason = "given by --vote-semantics"
        if inferred is not None and inferred != vote_semantics:
            reason += f"; the recipe's content suggests {inferred}: {why}"
            logger.warning("%s: --vote-semantics %s, but %s", printable(recipe.source), vote_semantics, why)
        semantics: Optional[str] = vote_semantics
    else:
        semantics, reason = inferred, ("inferred: " + why if inferred else why)
    t = _Translator(recipe, semantics, reason)
    plan = _finish(t, t.evaluate())
    uses_votes = plan.method in ("tgmd", "dgmla")
    finder = _Finder(Path(models_dir), recipe.source)

    def resolve(key: str) -> ResolvedModel:
        return finder.find(t.models[key])

    imp = MechaImport(
        method=plan.method,
        base=resolve(plan.base) if plan.base is not None else None,
        models=[resolve(m) for m in plan.models],
        parameters=plan.parameters,
        model_parameters=plan.model_parameters,
        vae_source=resolve(plan.vae) if plan.vae is not None else None,
        vote_semantics=semantics if uses_votes else None,
        vote_reason=reason if uses_votes else "",
        notes=plan.notes,
    )
    _check_distinct_files(recipe, imp)
    imp.yaml_text = _render(imp, recipe, digest, command, finder.root)
    return imp


def _check_distinct_files(recipe: MechaRecipe, imp: MechaImport) -> None:
    """Two of the recipe's inputs matched to one file would count it twice (or the base as a model)."""
    seen: Dict[str, ResolvedModel] = {}
    for m in ([imp.base] if imp.base else []) + imp.models:
        if not m.found:
            continue
        real = os.path.realpath(m.path)
        if real in seen:
            first = seen[real]
            raise recipe.error(m.line, f"model {printable(m.written)!r} is the same file as {printable(first.written)!r} "
                               f"(line {first.line}): {printable(m.path)}")
        seen[real] = m


def import_mecha(
    recipe_path: Union[str, os.PathLike[str]],
    models_dir: Union[str, os.PathLike[str]],
    *,
    vote_semantics: Optional[str] = None,
    allow_missing: bool = False,
    command: Optional[str] = None,
) -> MechaImport:
    """Read, translate and resolve a ``.mecha`` recipe. Inputs not found under ``models_dir``
    raise :class:`MissingInputsError` (listing them) unless ``allow_missing``, which writes them
    as placeholder paths under ``models_dir`` and lists them in the config's header."""
    recipe = read_recipe(recipe_path)
    digest = hashlib.sha256(Path(recipe_path).read_bytes()).hexdigest()
    imp = translate_recipe(recipe, models_dir, vote_semantics=vote_semantics, digest=digest, command=command)
    missing = imp.missing
    if missing and not allow_missing:
        names = ", ".join(f"{printable(m.written)} (line {m.line})" for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        total = len(imp.models) + (1 if imp.base else 0) + (1 if imp.vae_source else 0)
        raise MissingInputsError(
            f"{printable(recipe.source)}: {len(missing)} of {total} inputs not found under {printable(Path(models_dir).resolve())}: "
            f"{names}{more}; pass --allow-missing to write the config with placeholder paths",
            missing,
        )
    for m in missing:
        logger.warning("%s:%d: %s not found under %s (placeholder written)", printable(recipe.source), m.line,
                       printable(m.written), printable(models_dir))
    return imp
