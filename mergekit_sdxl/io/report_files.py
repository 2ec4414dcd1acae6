"""The report folder: ``report.json``, the PNG figures and an offline ``index.html``, written safely.

The folder is checked before any work (:func:`prepare_report_dir`): it is a folder (never an
input file, never a symlink), new, empty, or a report folder this package wrote; no name it
writes is an input; and a file under one of its names is replaced only if this package wrote it
(``report.json`` by its ``format``, ``index.html`` by its generator tag, PNGs by their
``Software`` text chunk). A user's other files in the folder are never touched. Every file goes
through a fresh temporary name and a rename (``io/safe_write.py``); ``report.json`` is written
last, so a folder with one holds a whole report. Figures an earlier report wrote and this one
does not are removed (only those).

The page needs no network: images are relative links, the style and the one script are inline.
The script counts the images that loaded (``data-images-loaded`` / ``data-images-total`` on
``<body>``) and says so on the page when one did not.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

from mergekit_sdxl.errors import OutputError
from mergekit_sdxl.io.output_guard import check_no_symlinks, check_not_foreign, check_writes_do_not_clash
from mergekit_sdxl.io.report_figures import PNG_SOFTWARE, figure_names, render_figures
from mergekit_sdxl.io.safe_write import atomic_write_bytes, atomic_write_text, describe_os_error

__all__ = ["REPORT_FORMAT", "REPORT_JSON", "INDEX_HTML", "is_our_report_file", "prepare_report_dir", "write_report"]

PathLike = Union[str, "os.PathLike[str]"]

REPORT_FORMAT = "mergekit-sdxl-report/1"
REPORT_JSON = "report.json"
INDEX_HTML = "index.html"
_GENERATOR_TAG = '<meta name="generator" content="mergekit-sdxl report">'
_COMPONENTS = ("model", "unet", "clip_l", "clip_g", "vae")


def report_file_names() -> List[str]:
    """Every name a report writes in its folder."""
    return [REPORT_JSON, INDEX_HTML, *figure_names(_COMPONENTS)]


def _head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def is_our_report_file(path: PathLike) -> bool:
    """True for a report.json, index.html or PNG this package wrote (by content, not by name)."""
    target = Path(path)
    if target.is_symlink() or not target.is_file():
        return False
    suffix = target.suffix.lower()
    if suffix == ".json":
        try:
            doc = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("format") == REPORT_FORMAT
    if suffix == ".html":
        return _GENERATOR_TAG.encode() in _head(target, 4096)
    if suffix == ".png":
        return b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in _head(target, 4096)
    return False


def prepare_report_dir(folder: PathLike, inputs: Iterable[Tuple[PathLike, str]]) -> None:
    """Refuse, before any work, a report folder that could overwrite anything not ours.

    ``inputs`` are ``(path, what)`` pairs of every file the command reads (``what`` as in
    :func:`~mergekit_sdxl.io.output_guard.check_writes_do_not_clash`).
    """
    target = Path(folder)
    if target.is_symlink():
        raise OutputError(f"{target}: is a symbolic link; give the real folder for the report")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; the report is a folder (choose another name)")
    writes = [target / name for name in report_file_names()]
    check_writes_do_not_clash(writes, inputs)
    if target.is_dir():
        visible = _visible_entries(target)
        if visible and not is_our_report_file(target / REPORT_JSON):
            raise OutputError(
                f"{target}: exists and holds files that are not a mergekit-sdxl report "
                f"(e.g. {visible[0]}); give a new or empty folder"
            )
        check_no_symlinks(writes)
        for path in writes:
            check_not_foreign(path, is_our_report_file, "a mergekit-sdxl report file")
            if path.exists() and not path.is_file():
                raise OutputError(f"{path}: exists and is not a file; refusing to replace it")


def _visible_entries(folder: Path) -> List[str]:
    try:
        return sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
    except OSError as error:
        raise OutputError(describe_os_error(error, folder)) from error


def _earlier_files(folder: Path) -> List[str]:
    path = folder / REPORT_JSON
    if not is_our_report_file(path):
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    files = doc.get("files")
    allowed = set(report_file_names())
    return [f for f in files if isinstance(f, str) and f in allowed] if isinstance(files, list) else []


def write_report(folder: PathLike, report: Mapping[str, Any], inputs: Iterable[Tuple[PathLike, str]] = ()) -> Path:
    """Write the report (figures, ``index.html``, ``report.json``) into ``folder``; returns the page's path.

    The folder checks of :func:`prepare_report_dir` run again here (against ``inputs``), so a
    folder that changed since is still never written over.
    """
    target = Path(folder)
    prepare_report_dir(target, inputs)
    figures = render_figures(report)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(describe_os_error(error, target)) from error
    earlier = _earlier_files(target)
    for name, png, _title in figures:
        atomic_write_bytes(target / name, png)
    page = target / INDEX_HTML
    atomic_write_text(page, render_html(report, [(name, title) for name, _png, title in figures]))
    files = [REPORT_JSON, INDEX_HTML, *(name for name, _png, _title in figures)]
    doc = dict(report)
    doc["files"] = files
    atomic_write_text(target / REPORT_JSON, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    for stale in sorted(set(earlier) - set(files)):
        path = target / stale
        if is_our_report_file(path):
            try:
                path.unlink()
            except OSError as error:
                raise OutputError(describe_os_error(error, path)) from error
    return page


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .note { color: #555; font-size: 0.95em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.flag { color: #a33; } .ok { color: #363; } #broken { color: #a33; font-weight: bold; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", String(loaded));
  document.body.setAttribute("data-images-total", String(images.length));
  if (loaded < images.length) {
    var note = document.getElementById("broken");
    note.textContent = (images.length - loaded) + " of " + images.length +
      " figures did not load: keep the PNG files next to index.html.";
  }
});
"""

_EXPLAIN = {
    "similarity": (
        "Cosine similarity of the task vectors X<sub>i</sub> &minus; B (each input minus the base) over every "
        "merged key. Rows and columns are ordered by average-linkage clustering, so inputs that moved the "
        "base the same way form blocks. Red: they agree; blue: they pull in opposite directions; white: "
        "unrelated changes. A dark red pair is a near-duplicate (flagged above 0.99)."
    ),
    "median_weight": (
        "The normalised Weiszfeld weight of each input in the geometric median, averaged over each block's "
        "elements, times N: 1 is an equal share, below 0.1 the median all but ignored that input "
        "(an outlier). Rows follow the clustering of the first heat map."
    ),
    "block_change": (
        "How much the merge changed each block: ||merged &minus; base|| / ||base|| over the block's keys."
    ),
    "sign_agreement": (
        "Per block, the fraction of elements whose elected sign (TIES) is shared by more than half of the "
        "inputs that moved that element. Low values: the inputs disagree there, and sign election "
        "discards much of what they changed."
    ),
    "task_vector_norm": (
        "The length of each input's task vector relative to the base. An input near zero is (almost) "
        "the base itself and contributes nothing (flagged below 0.001)."
    ),
}


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != 0.0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def _flag_items(report: Mapping[str, Any]) -> List[str]:
    flags = report.get("flags") or {}
    items: List[str] = []
    for entry in flags.get("near_duplicates", []):
        a, b = entry["inputs"]
        items.append(f"near-duplicates: <b>{_esc(a)}</b> and <b>{_esc(b)}</b> (cosine {_fmt(entry['cosine'])})")
    for entry in flags.get("near_base", []):
        items.append(
            f"almost the base: <b>{_esc(entry['input'])}</b> (||X &minus; B|| / ||B|| = {_fmt(entry['relative_norm'])})"
        )
    for entry in flags.get("median_outliers", []):
        items.append(
            f"median outlier: <b>{_esc(entry['input'])}</b> (weight {_fmt(entry['weight'])}, "
            f"mean {_fmt(entry['mean'])})"
        )
    return items


def _figure(name: str, title: str, text: str) -> str:
    return (
        f'<figure><a href="{_esc(name)}"><img src="{_esc(name)}" alt="{_esc(title)}"></a>'
        f"<figcaption>{_esc(title)} (click for full size)</figcaption></figure>\n"
        + (f'<p class="note">{text}</p>\n' if text else "")
    )


def _inputs_table(report: Mapping[str, Any]) -> str:
    inputs: Sequence[str] = report["inputs"]
    relative: Sequence[float] = report["relative_task_vector_norm"]["model"]
    median = (report.get("median_weight") or {}).get("components", {}).get("model")
    head = "<tr><th>#</th><th>input</th><th>||X &minus; B|| / ||B||</th>"
    head += "<th>median weight &times; N</th></tr>" if median else "</tr>"
    rows = [head]
    n = len(inputs)
    for i, name in enumerate(inputs):
        cells = f'<td class="num">{i + 1}</td><td>{_esc(name)}</td><td class="num">{_fmt(relative[i])}</td>'
        if median:
            cells += f'<td class="num">{_fmt(median[i] * n, 3)}</td>'
        rows.append(f"<tr>{cells}</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>\n"


def render_html(report: Mapping[str, Any], figures: Sequence[Tuple[str, str]]) -> str:
    """The offline page: the figures (relative links) with short explanations, flags and inputs."""
    by_name: Dict[str, str] = dict(figures)
    n = len(report["inputs"])
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        _GENERATOR_TAG + "\n",
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>Merge report: {_esc(report['method'])}, {n} inputs</title>\n",
        f"<style>{_STYLE}</style>\n</head>\n<body>\n",
        f"<h1>Merge report</h1>\n<p class=\"meta\">method <b>{_esc(report['method'])}</b> &middot; base "
        f"<b>{_esc(report['base'])}</b> &middot; {n} inputs &middot; {report['keys']} merged keys &middot; "
        f"{_esc(report.get('generator', ''))}</p>\n",
        f"<p class=\"note\">Statistics from {_esc(report['statistics_from'])}; block change from "
        f"{_esc(report['block_change_from'])}.",
    ]
    if report.get("median_weight_from"):
        parts.append(f" Median weights from {_esc(report['median_weight_from'])}.")
    parts.append(f' All numbers are in <a href="{REPORT_JSON}">{REPORT_JSON}</a>.</p>\n<p id="broken"></p>\n')
    items = _flag_items(report)
    parts.append("<h2>Flags</h2>\n")
    if items:
        parts.append("<ul>\n" + "".join(f'<li class="flag">{item}</li>\n' for item in items) + "</ul>\n")
    else:
        parts.append('<p class="ok">No near-duplicates, no input at the base, no median outlier.</p>\n')
    sections = [
        ("Which inputs agree", [k for k in by_name if k.startswith("similarity_")], "similarity"),
        ("What the median made of each input", ["median_weight.png"], "median_weight"),
        ("What changed where", ["block_change.png"], "block_change"),
        ("Where the inputs agree on the sign", ["sign_agreement.png"], "sign_agreement"),
        ("How far each input moved", ["task_vector_norm.png"], "task_vector_norm"),
    ]
    for heading, names, explain in sections:
        present = [name for name in names if name in by_name]
        if not present:
            continue
        parts.append(f"<h2>{_esc(heading)}</h2>\n")
        for index, name in enumerate(present):
            parts.append(_figure(name, by_name[name], _EXPLAIN[explain] if index == 0 else ""))
    parts.append("<h2>Inputs</h2>\n")
    parts.append(_inputs_table(report))
    parts.append(f"<script>{_SCRIPT}</script>\n</body>\n</html>\n")
    return "".join(parts)
