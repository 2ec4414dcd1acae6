"""The statistics of a merge report: a stats sink fed once per merged key, and the report.json it builds.

Mergekit-free. Two producers feed the same :class:`ReportCollector`:

- ``mergekit-sdxl report CONFIG -o DIR`` (``host/report_pass.py``) streams the inputs itself;
- ``mergekit-sdxl merge ... --report DIR`` feeds it the merge's own per-key statistics.

The interface, for a producer::

    collector = ReportCollector(inputs=["a.safetensors", "b.safetensors"], base="base.safetensors",
                                method="tgmd", statistics_from="the merge")
    for each merged key (any order, each key once):
        collector.add_key(
            name,                        # canonical key name, e.g. "model.diffusion_model.out.2.weight"
            block_id=report_block_of(name),   # IN00..OUT08, BASE, clip_l.00.., clip_g.00.., VAE
            component=component_of(name),     # unet | clip_l | clip_g | vae
            gram=G,                      # [N, N] float64: G_ij = <X_i - B, X_j - B> over this key's elements,
                                         #   raw task vectors (an input lacking the key: a zero vector)
            median_coeffs=c,             # [N] the Weiszfeld coefficients of this key (sum 1; 0 for an input
                                         #   left out), or None when the method takes no median
            base_norm_sq=||B||^2,        # of this key, float
            change_norm_sq=||M - B||^2,  # merged (as saved) minus base; None if unknown
            sign_agree_fraction=f,       # fraction of this key's elements whose elected sign is shared by
                                         #   more than half of the non-zero votes (an element without votes: no)
            elements=numel,
        )
    report = collector.build()           # the report.json document: plain JSON values
    io.report_files.write_report(folder, report)

:class:`KeyAccumulator` computes those per-key numbers from row chunks (base, task vectors and,
optionally, the merged rows); a producer that has them already calls ``add_key`` directly.
Per-block and per-component numbers are sums over keys (Grams, squared norms) or element-weighted
means (median weights, sign agreement), so feeding order does not matter beyond rounding.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_sdxl.io.report_files import REPORT_FORMAT
from mergekit_sdxl.kernels.consensus import elect_sign
from mergekit_sdxl.kernels.geomedian import GramAccumulator
from mergekit_sdxl.sdxl.manifest import BLOCK_IDS, COMPONENT_PREFIXES, NUM_LAYERS, block_of, component_of, layer_of
from mergekit_sdxl.version import __version__

__all__ = [
    "REPORT_FORMAT",
    "NEAR_DUPLICATE_COSINE",
    "NEAR_BASE_RELATIVE",
    "OUTLIER_FRACTION_OF_MEAN",
    "MEDIAN_METHODS",
    "KeyStatistics",
    "KeyAccumulator",
    "ReportCollector",
    "report_block_of",
    "report_block_order",
    "cluster_order",
    "cosine_matrix",
]

# The flags' thresholds (issue 14): a pair this similar is a copy in all but name; an input this
# close to the base changes nothing; a tenth of the mean weight is what the median all but ignored.
NEAR_DUPLICATE_COSINE = 0.99
NEAR_BASE_RELATIVE = 1e-3
OUTLIER_FRACTION_OF_MEAN = 0.1

# Methods whose result is a geometric median of the (masked) task vectors or models.
MEDIAN_METHODS = frozenset({"tgmd", "geometric_median", "dgmla"})

_TEXT = ("clip_l", "clip_g")
_SIMILARITY_COMPONENTS = ("unet", "clip_l", "clip_g")


def report_block_of(key: str) -> str:
    """The report's block id of a key: the UNet's MBW ids (``BASE`` = time/label embeddings,
    IN00..IN08, M00, OUT00..OUT08), one id per text-encoder layer (``clip_l.00``..``clip_l.11``,
    ``clip_g.00``..``clip_g.31``, the embeddings and final norms/projection as ``clip_l.other``
    / ``clip_g.other``), and ``VAE``."""
    component = component_of(key)
    if component in _TEXT:
        layer = layer_of(key)
        return f"{component}.{layer[1]:02d}" if layer is not None else f"{component}.other"
    return block_of(key)


def report_block_order() -> Tuple[str, ...]:
    """Every block id :func:`report_block_of` can return, in display order (UNet, CLIP-L, CLIP-G, VAE)."""
    unet = tuple(b for b in BLOCK_IDS if b != "VAE")
    text: Tuple[str, ...] = ()
    for c in _TEXT:
        text += tuple(f"{c}.{i:02d}" for i in range(NUM_LAYERS[c])) + (f"{c}.other",)
    return unet + text + ("VAE",)


_BLOCK_RANK = {b: i for i, b in enumerate(report_block_order())}
_TEXT_BLOCK = re.compile(r"(clip_[lg])\.(\d\d|other)")


def _block_component(block_id: str) -> str:
    m = _TEXT_BLOCK.fullmatch(block_id)
    if m:
        return m.group(1)
    return "vae" if block_id == "VAE" else "unet"


@dataclass(frozen=True)
class KeyStatistics:
    """What :meth:`ReportCollector.add_key` takes for one key (see the module docstring)."""

    gram: torch.Tensor
    base_norm_sq: float
    change_norm_sq: Optional[float]
    sign_agree_fraction: float
    elements: int


class KeyAccumulator:
    """Accumulates one key's statistics over row chunks, in float64.

    ``update(base [k], deltas [N, k], merged [k] or None)`` per chunk, in element order (the Gram
    matrix is re-blocked canonically, so chunk sizes do not change it); ``sign_election`` is
    ``"count"`` (one vote per input, the default of tgmd/ties_soup) or ``"sum"`` (signed movement).
    """

    def __init__(self, n: int, sign_election: str = "count") -> None:
        if sign_election not in ("count", "sum"):
            raise ValueError(f"sign_election must be 'count' or 'sum', got {sign_election!r}")
        self.n = n
        self.sign_election = sign_election
        self._gram = GramAccumulator(n, device="cpu")
        self._base_sq = 0.0
        self._change_sq: Optional[float] = 0.0
        self._agree = 0
        self._elements = 0

    def update(self, base: torch.Tensor, deltas: torch.Tensor, merged: Optional[torch.Tensor] = None) -> None:
        """Feed the next ``k`` elements: the base's, every input's task vector, the merged result's."""
        b = base.reshape(-1).to(torch.float64)
        d = deltas.to(torch.float64)
        if d.dim() != 2 or d.shape[0] != self.n or d.shape[1] != b.numel():
            raise ValueError(f"deltas must be [{self.n}, {b.numel()}], got {tuple(d.shape)}")
        self._gram.update(d)
        self._base_sq += float(torch.dot(b, b))
        if merged is None:
            self._change_sq = None
        elif self._change_sq is not None:
            change = merged.reshape(-1).to(torch.float64) - b
            self._change_sq += float(torch.dot(change, change))
        self._agree += _agreeing_elements(d, self.sign_election)
        self._elements += b.numel()

    def result(self) -> KeyStatistics:
        """The key's statistics (the Gram of the raw task vectors, squared norms, sign agreement)."""
        fraction = self._agree / self._elements if self._elements else 0.0
        return KeyStatistics(self._gram.result(), self._base_sq, self._change_sq, fraction, self._elements)


def _agreeing_elements(deltas: torch.Tensor, election: str) -> int:
    """Elements whose elected sign is shared by more than half of the non-zero votes."""
    if deltas.shape[0] == 0 or deltas.shape[1] == 0:
        return 0
    pos = (deltas > 0).sum(dim=0, dtype=torch.int64)
    neg = (deltas < 0).sum(dim=0, dtype=torch.int64)
    if election == "sum":
        sign = elect_sign(deltas, "sum")
    else:
        sign = torch.sign(pos - neg)
    shared = torch.where(sign > 0, pos, torch.where(sign < 0, neg, torch.zeros_like(pos)))
    return int((2 * shared > pos + neg).sum())


def cosine_matrix(gram: torch.Tensor) -> List[List[float]]:
    """Cosine similarities from a Gram matrix; a zero vector has similarity 0 to the others (1 to itself)."""
    g = gram.to(torch.float64)
    norms = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0))
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, g / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    cos = torch.clamp(cos, -1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return [[float(v) for v in row] for row in cos]


def cluster_order(similarity: Sequence[Sequence[float]]) -> List[int]:
    """Leaf order of an average-linkage (UPGMA) clustering on the distance ``1 - similarity``.

    Deterministic: the closest pair of clusters merges first, ties going to the pair with the
    lowest leaf indices; a merged cluster lists the leaves of the cluster holding the lowest index
    first. Similar inputs end up next to each other, so blocks show in a heat map.
    """
    n = len(similarity)
    if n <= 2:
        return list(range(n))
    dist = 1.0 - torch.tensor(similarity, dtype=torch.float64)
    dist = (dist + dist.T) / 2  # exactly symmetric, whatever the rounding of the input
    big = float("inf")
    dist.fill_diagonal_(big)
    leaves: Dict[int, List[int]] = {i: [i] for i in range(n)}
    sizes = torch.ones(n, dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    for _ in range(n - 1):
        masked = torch.where(alive[:, None] & alive[None, :], dist, torch.full_like(dist, big))
        flat = int(torch.argmin(masked))  # the first minimum in row-major order: lowest (i, j)
        i, j = divmod(flat, n)
        a, b = (i, j) if min(leaves[i]) < min(leaves[j]) else (j, i)
        # Lance-Williams update for average linkage: d(a+b, c) = (|a| d(a,c) + |b| d(b,c)) / (|a|+|b|).
        merged = (sizes[a] * dist[a] + sizes[b] * dist[b]) / (sizes[a] + sizes[b])
        dist[a] = merged
        dist[:, a] = merged
        dist[a, a] = big
        sizes[a] += sizes[b]
        alive[b] = False
        dist[b] = big
        dist[:, b] = big
        leaves[a] = leaves[a] + leaves.pop(b)
    (order,) = leaves.values()
    return order


class _Sums:
    """Running sums of one block or component."""

    def __init__(self, n: int) -> None:
        self.gram = torch.zeros(n, n, dtype=torch.float64)
        self.base_sq = 0.0
        self.change_sq: Optional[float] = 0.0
        self.agree = 0.0
        self.elements = 0
        self.coeff_sum = torch.zeros(n, dtype=torch.float64)
        self.coeff_elements = 0
        self.keys = 0

    def add(
        self,
        gram: torch.Tensor,
        coeffs: Optional[torch.Tensor],
        base_sq: float,
        change_sq: Optional[float],
        agree_fraction: float,
        elements: int,
    ) -> None:
        self.gram += gram
        self.base_sq += base_sq
        self.change_sq = None if change_sq is None or self.change_sq is None else self.change_sq + change_sq
        self.agree += agree_fraction * elements
        self.elements += elements
        if coeffs is not None:
            self.coeff_sum += coeffs * elements
            self.coeff_elements += elements
        self.keys += 1

    def median_weight(self) -> Optional[List[float]]:
        if not self.coeff_elements:
            return None
        return [float(v) for v in self.coeff_sum / self.coeff_elements]

    def change(self) -> Optional[float]:
        if self.change_sq is None or self.base_sq <= 0.0:
            return None
        return math.sqrt(self.change_sq / self.base_sq)


class ReportCollector:
    """The stats sink of a merge report: :meth:`add_key` per merged key, then :meth:`build`.

    ``inputs`` are the non-base inputs' file names in config order; ``statistics_from`` and
    ``block_change_from`` say in the report where the numbers come from (a report pass over the
    inputs, the merge itself, a finished merge file).
    """

    def __init__(
        self,
        inputs: Sequence[str],
        *,
        base: str,
        method: str,
        statistics_from: str,
        block_change_from: str,
        median_weight_from: Optional[str] = None,
    ) -> None:
        if not inputs:
            raise ValueError("a report needs at least one input besides the base")
        self.inputs = list(inputs)
        self.n = len(self.inputs)
        self.base = base
        self.method = method
        self.statistics_from = statistics_from
        self.block_change_from = block_change_from
        self.median_weight_from = median_weight_from
        self._blocks: Dict[str, _Sums] = {}
        self._components: Dict[str, _Sums] = {}
        self._model = _Sums(self.n)
        self._seen: set = set()

    def add_key(
        self,
        name: str,
        *,
        block_id: str,
        component: str,
        gram: torch.Tensor,
        median_coeffs: Optional[Sequence[float]],
        base_norm_sq: float,
        change_norm_sq: Optional[float],
        sign_agree_fraction: float,
        elements: int,
    ) -> None:
        """Record one merged key (see the module docstring for each argument)."""
        if name in self._seen:
            raise ValueError(f"{name}: added to the report twice")
        if component not in COMPONENT_PREFIXES:
            raise ValueError(f"{name}: unknown component {component!r}")
        g = torch.as_tensor(gram, dtype=torch.float64).cpu()
        if tuple(g.shape) != (self.n, self.n):
            raise ValueError(f"{name}: gram must be [{self.n}, {self.n}], got {tuple(g.shape)}")
        coeffs = None
        if median_coeffs is not None:
            coeffs = torch.as_tensor(median_coeffs, dtype=torch.float64).reshape(-1).cpu()
            if coeffs.numel() != self.n:
                raise ValueError(f"{name}: median_coeffs must have {self.n} entries, got {coeffs.numel()}")
        if not 0.0 <= sign_agree_fraction <= 1.0:
            raise ValueError(f"{name}: sign_agree_fraction must be in [0, 1], got {sign_agree_fraction}")
        self._seen.add(name)
        values = (g, coeffs, float(base_norm_sq), change_norm_sq, float(sign_agree_fraction), int(elements))
        for sums in (
            self._blocks.setdefault(block_id, _Sums(self.n)),
            self._components.setdefault(component, _Sums(self.n)),
            self._model,
        ):
            sums.add(*values)

    @property
    def keys(self) -> int:
        """How many keys were added."""
        return len(self._seen)

    def build(self) -> Dict[str, object]:
        """The report.json document (plain JSON values: lists, floats, strings, None)."""
        if not self._seen:
            raise ValueError("no key was added to the report")
        components = [c for c in COMPONENT_PREFIXES if c in self._components]
        tables = {"model": self._model, **{c: self._components[c] for c in components}}
        # The four similarity tables always exist; the VAE only where it was merged.
        names = ["model", *_SIMILARITY_COMPONENTS, *(["vae"] if "vae" in self._components else [])]
        empty = _Sums(self.n)
        similarity = {c: cosine_matrix(tables.get(c, empty).gram) for c in names}
        norms = {c: _norms(tables.get(c, empty).gram) for c in names}
        base_norm = {c: math.sqrt(max(tables.get(c, empty).base_sq, 0.0)) for c in names}
        relative = {c: [v / base_norm[c] if base_norm[c] > 0 else 0.0 for v in norms[c]] for c in names}
        blocks = sorted(self._blocks, key=lambda b: (_BLOCK_RANK.get(b, len(_BLOCK_RANK)), b))
        median = self._median_weights(blocks, names, tables)
        report: Dict[str, object] = {
            "format": REPORT_FORMAT,
            "generator": f"mergekit-sdxl {__version__}",
            "method": self.method,
            "base": self.base,
            "inputs": list(self.inputs),
            "statistics_from": self.statistics_from,
            "block_change_from": self.block_change_from,
            "median_weight_from": self.median_weight_from if median is not None else None,
            "keys": self.keys,
            "elements": {c: tables.get(c, empty).elements for c in names},
            "blocks": blocks,
            "block_component": {b: _block_component(b) for b in blocks},
            "similarity": similarity,
            "similarity_order": {c: cluster_order(similarity[c]) for c in names},
            "task_vector_norm": norms,
            "base_norm": base_norm,
            "relative_task_vector_norm": relative,
            "median_weight": median,
            "block_change": {b: self._blocks[b].change() for b in blocks},
            "sign_agreement": {
                b: (self._blocks[b].agree / self._blocks[b].elements if self._blocks[b].elements else 0.0) for b in blocks
            },
            "thresholds": {
                "near_duplicate_cosine": NEAR_DUPLICATE_COSINE,
                "near_base_relative": NEAR_BASE_RELATIVE,
                "median_outlier_fraction_of_mean": OUTLIER_FRACTION_OF_MEAN,
            },
        }
        report["flags"] = _flags(self.inputs, similarity["model"], relative["model"], median)
        return report

    def _median_weights(
        self, blocks: Sequence[str], names: Sequence[str], tables: Dict[str, _Sums]
    ) -> Optional[Dict[str, Dict[str, List[float]]]]:
        if not self._model.coeff_elements:
            return None
        per_block = {b: w for b in blocks if (w := self._blocks[b].median_weight()) is not None}
        per_component = {c: w for c in names if c in tables and (w := tables[c].median_weight()) is not None}
        return {"blocks": per_block, "components": per_component}


def _norms(gram: torch.Tensor) -> List[float]:
    return [math.sqrt(max(float(v), 0.0)) for v in torch.diagonal(gram)]


def _flags(
    inputs: Sequence[str],
    similarity: Sequence[Sequence[float]],
    relative: Sequence[float],
    median: Optional[Dict[str, Dict[str, List[float]]]],
) -> Dict[str, List[Dict[str, object]]]:
    n = len(inputs)
    duplicates: List[Dict[str, object]] = [
        {"inputs": [inputs[i], inputs[j]], "cosine": similarity[i][j]}
        for i in range(n)
        for j in range(i + 1, n)
        if similarity[i][j] > NEAR_DUPLICATE_COSINE
    ]
    near_base: List[Dict[str, object]] = [
        {"input": inputs[i], "relative_norm": relative[i]} for i in range(n) if relative[i] < NEAR_BASE_RELATIVE
    ]
    outliers: List[Dict[str, object]] = []
    weights = (median or {}).get("components", {}).get("model")
    if weights:
        mean = sum(weights) / len(weights)
        outliers = [
            {"input": inputs[i], "weight": w, "mean": mean}
            for i, w in enumerate(weights)
            if w < OUTLIER_FRACTION_OF_MEAN * mean
        ]
    return {"near_duplicates": duplicates, "near_base": near_base, "median_outliers": outliers}
