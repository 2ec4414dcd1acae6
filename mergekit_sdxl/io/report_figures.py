"""The PNG figures of a merge report, drawn with matplotlib from the report.json document.

matplotlib is the optional ``report`` extra: it is imported only here, inside the functions, and
:func:`require_matplotlib` turns its absence into one line telling how to install it. No pyplot
(no global figure state, no GUI backend): each figure is a ``matplotlib.figure.Figure`` rendered
by Agg to PNG bytes, tagged with :data:`PNG_SOFTWARE` so the report folder can tell its own files.

Sizes follow the number of inputs and blocks: a cell stays at least 0.12 inch (12 px at 100 dpi),
tick labels are shortened file names with their 1-based input number, so 100+ inputs stay legible
(open the PNG at full size).
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_sdxl.errors import UserError

__all__ = ["PNG_SOFTWARE", "MissingExtraError", "REPORT_EXTRA_HINT", "require_matplotlib", "render_figures"]

PNG_SOFTWARE = "mergekit-sdxl report"
REPORT_EXTRA_HINT = "pip install 'mergekit-sdxl[report]' (or pip install matplotlib)"

_DPI = 100
_MIN_CELL = 0.12  # inches
_SIMILARITY_FLOOR = 0.1
_COMPONENT_COLOURS = {"unet": "#4c72b0", "clip_l": "#dd8452", "clip_g": "#55a868", "vae": "#8172b3"}
_COMPONENT_LABELS = {"unet": "UNet", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "vae": "VAE", "model": "whole model"}


class MissingExtraError(UserError):
    """The report figures need matplotlib, which a plain install does not have."""


def require_matplotlib() -> None:
    """Raise :class:`MissingExtraError` (one line: how to install it) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(f"the report's figures need matplotlib, which is not installed: {REPORT_EXTRA_HINT}") from error


def short_label(name: str, index: int, width: int = 32) -> str:
    """``"12 some_model_name"``: 1-based input number and the file name without its suffix, the
    middle elided to ``width`` characters."""
    stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    if len(stem) > width:
        keep = width - 1
        stem = stem[: (keep + 1) // 2] + "\u2026" + stem[len(stem) - keep // 2 :]
    return f"{index + 1} {stem}"


def _font(cell_inches: float) -> float:
    return max(5.0, min(9.0, cell_inches * 72 * 0.75))


def _cell(n: int, span: float = 7.0, largest: float = 0.4) -> float:
    return max(_MIN_CELL, min(largest, span / max(n, 1)))


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": PNG_SOFTWARE})
    return buffer.getvalue()


def _similarity_figure(matrix: Sequence[Sequence[float]], order: Sequence[int], labels: Sequence[str], title: str) -> bytes:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    n = len(order)
    data = np.asarray(matrix, dtype=float)[np.ix_(order, order)]
    off = ~np.eye(n, dtype=bool)
    # The diagonal (always 1) is greyed out so that the scale is set by the pairs themselves.
    # A floor of 0.1: the near-zero similarities of unrelated fine-tunes stay white instead of
    # being stretched over the whole scale.
    limit = max(_SIMILARITY_FLOOR, float(np.abs(data[off]).max()) if n > 1 else 1.0)
    cell = _cell(n)
    font = _font(cell)
    label_inches = max(len(label) for label in labels) * font / 72 * 0.62 + 0.4
    side = n * cell
    width = max(6.5, side + label_inches + 1.8)
    fig = Figure(figsize=(width, max(4.5, side + label_inches + 0.9)), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="#c8c8c8")
    image = ax.imshow(np.ma.masked_where(~off, data), cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
    ticks = list(range(n))
    ordered = [labels[i] for i in order]
    ax.set_xticks(ticks, ordered, rotation=90, fontsize=font)
    ax.set_yticks(ticks, ordered, fontsize=font)
    ax.set_title(title, fontsize=11)
    bar = fig.colorbar(image, ax=ax, shrink=min(1.0, max(0.5, 4.0 / max(side, 1.0))))
    bar.set_label("cosine similarity")
    return _png(fig)


def _median_figure(report: Mapping[str, Any], labels: Sequence[str]) -> Optional[bytes]:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    median = report.get("median_weight")
    if not median or not median.get("blocks"):
        return None
    blocks = [b for b in report["blocks"] if b in median["blocks"]]
    order = report["similarity_order"]["model"]
    n = len(labels)
    # N x weight: 1 is an equal share, 0.1 the outlier threshold.
    data = np.asarray([[median["blocks"][b][i] * n for b in blocks] for i in order], dtype=float)
    top = max(2.0, float(data.max()))
    row = _cell(n)
    col = max(0.16, min(0.4, 10.0 / max(len(blocks), 1)))
    font = _font(min(row, col))
    label_inches = max(len(label) for label in labels) * font / 72 * 0.62 + 0.4
    fig = Figure(figsize=(max(6.5, len(blocks) * col + label_inches + 1.8), n * row + 1.6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        data, cmap=colormaps["RdBu"], norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top), aspect="auto", interpolation="nearest"
    )
    ax.set_xticks(range(len(blocks)), blocks, rotation=90, fontsize=font)
    ax.set_yticks(range(n), [labels[i] for i in order], fontsize=font)
    ax.set_title("Weight of each input in the geometric median, per block", fontsize=11)
    bar = fig.colorbar(image, ax=ax, shrink=min(1.0, max(0.5, 4.0 / max(n * row, 1.0))))
    bar.set_label("N x weight (1 = an equal share)")
    return _png(fig)


def _block_bars(report: Mapping[str, Any], field: str, title: str, ylabel: str, limit: Optional[float]) -> Optional[bytes]:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    values: Mapping[str, Optional[float]] = report.get(field) or {}
    blocks = [b for b in report["blocks"] if values.get(b) is not None]
    if not blocks:
        return None
    component = report["block_component"]
    width = max(8.0, len(blocks) * 0.2 + 2.0)
    fig = Figure(figsize=(width, 4.2), layout="constrained")
    ax = fig.add_subplot()
    heights = [float(values[b]) for b in blocks]  # type: ignore[arg-type]
    colours = [_COMPONENT_COLOURS.get(component[b], "#777777") for b in blocks]
    ax.bar(range(len(blocks)), heights, color=colours, width=0.8)
    ax.set_xticks(range(len(blocks)), blocks, rotation=90, fontsize=7)
    ax.set_xlim(-0.7, len(blocks) - 0.3)
    if limit is not None:
        ax.set_ylim(0.0, limit)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    shown = [c for c in _COMPONENT_COLOURS if any(component[b] == c for b in blocks)]
    ax.legend(handles=[Patch(color=_COMPONENT_COLOURS[c], label=_COMPONENT_LABELS[c]) for c in shown], fontsize=8)
    return _png(fig)


def _norm_figure(report: Mapping[str, Any], labels: Sequence[str]) -> bytes:
    from matplotlib.figure import Figure

    relative: List[float] = report["relative_task_vector_norm"]["model"]
    n = len(relative)
    row = max(0.16, min(0.35, 6.0 / max(n, 1)))
    font = _font(row)
    label_inches = max(len(label) for label in labels) * font / 72 * 0.62 + 0.4
    fig = Figure(figsize=(6.5 + label_inches, n * row + 1.4), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(n), relative, color="#4c72b0", height=0.8)
    ax.set_yticks(range(n), list(labels), fontsize=font)
    ax.set_ylim(n - 0.4, -0.6)  # input 1 at the top
    ax.set_xlabel("||X_i - B|| / ||B|| over the merged keys")
    ax.set_title("How far each input is from the base", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def render_figures(report: Mapping[str, Any]) -> List[Tuple[str, bytes, str]]:
    """``(file name, PNG bytes, title)`` of every figure the report has data for."""
    require_matplotlib()
    inputs: List[str] = report["inputs"]
    labels = [short_label(name, i) for i, name in enumerate(inputs)]
    figures: List[Tuple[str, bytes, str]] = []
    similarity: Dict[str, Any] = report["similarity"]
    for component, matrix in similarity.items():
        title = f"Task-vector similarity: {_COMPONENT_LABELS.get(component, component)} (clustered)"
        png = _similarity_figure(matrix, report["similarity_order"][component], labels, title)
        figures.append((f"similarity_{component}.png", png, title))
    median = _median_figure(report, labels)
    if median is not None:
        figures.append(("median_weight.png", median, "Median weight per input and block"))
    change = _block_bars(report, "block_change", "Change of the merge per block: ||merged - base|| / ||base||", "relative change", None)
    if change is not None:
        figures.append(("block_change.png", change, "Change per block"))
    agree = _block_bars(
        report, "sign_agreement", "Sign agreement per block: elected sign shared by a majority of the votes", "fraction of elements", 1.0
    )
    if agree is not None:
        figures.append(("sign_agreement.png", agree, "Sign agreement per block"))
    figures.append(("task_vector_norm.png", _norm_figure(report, labels), "Distance of each input from the base"))
    return figures


def figure_names(components: Sequence[str]) -> List[str]:
    """Every file name :func:`render_figures` may write for these similarity components."""
    names = [f"similarity_{c}.png" for c in components]
    return names + ["median_weight.png", "block_change.png", "sign_agreement.png", "task_vector_norm.png"]
