"""``merge --report DIR``: the report's statistics taken from the merge's own reads, no pass of its own.

While a :class:`MergeReportRecorder` is active (:func:`recording`), every merged key's
``MergeKeyTask`` (host/tasks.py) hands its row readers to :meth:`MergeReportRecorder.start_key`,
which wraps them: each chunk the merge reads is offered to the key's :class:`KeyRecording`, and
when the base and every input of one row range have been read (the merge reads them together,
chunk after chunk), that range's raw task vectors ``X_i - B`` feed
``workflow/report_stats.KeyAccumulator`` (Gram, base norm, sign agreement) and are dropped. The
median methods tell their Weiszfeld coefficients through ``ReaderInputs.on_median`` (the merge's
own weights, after DROP, trim and sign masks). When the key's value is cast to its save dtype
(``OutputTensor``, :meth:`MergeReportRecorder.saved`), it gives the block change
``||merged - base||`` against the base rows the recording kept (one key's base, in its stored dtype).

Rows the merge did not read for every input together (a method that ignores the base, such as
geometric_median; pre-passes that read one input at a time are simply not taken) are read once
more at the end of the key and counted in :attr:`MergeReportRecorder.reread_bytes`. Keys the
recorder never saw (a resumed merge wrote them earlier: :attr:`MergeReportRecorder.resumed`) are
left to the caller: cli/merge_cmd.py adds them by a pass over them and the finished output.

Memory: on top of the merge's own, one chunk's float64 task vectors (at most half a chunk of the
plan, ``budget / 8``), a copy of the chunk's stored rows, the Gram's carry (less than 65536
elements per input) and one key's base rows.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from mergekit_sdxl.kernels.memory_plan import MemoryPlan
from mergekit_sdxl.kernels.tgmd import rows_cols
from mergekit_sdxl.sdxl.keys import POSITION_IDS_KEY
from mergekit_sdxl.sdxl.manifest import component_of
from mergekit_sdxl.workflow.report_stats import MEDIAN_METHODS, KeyAccumulator, ReportCollector, report_block_of

LOG = logging.getLogger(__name__)

__all__ = [
    "MergeReportRecorder",
    "KeyRecording",
    "recording",
    "active_recorder",
    "new_recorder",
    "reported_inputs",
    "report_models",
    "input_label",
    "is_merged_key",
]

RowReader = Callable[[int, int], Optional[torch.Tensor]]

_RECORDER: ContextVar[Optional[MergeReportRecorder]] = ContextVar("mergekit_sdxl_report_recorder", default=None)


def is_merged_key(name: str, vae_merged: bool) -> bool:
    """Whether a report covers this key: what the merge merges (the planner's SDXL rules)."""
    component = component_of(name)
    if component is None or name == POSITION_IDS_KEY or name.endswith(".logit_scale"):
        return False
    return component != "vae" or vae_merged


def active_recorder() -> Optional[MergeReportRecorder]:
    """The recorder of the merge running in this context, if it reports."""
    return _RECORDER.get()


@contextmanager
def recording(recorder: MergeReportRecorder) -> Iterator[MergeReportRecorder]:
    """Make ``recorder`` the active one for the merge run inside (lane threads copy the context)."""
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


class MergeReportRecorder:
    """Feeds a :class:`ReportCollector` from the merge of each key (thread-safe).

    ``models``: the config's non-base inputs in config order (mergekit model references), the
    collector's inputs; ``base``: the base model's reference; ``sign_election``: the method's (``count`` or ``sum``); ``merged_key``:
    whether a key name is one the report covers.
    """

    def __init__(
        self,
        collector: ReportCollector,
        models: Sequence[Any],
        *,
        base: Any,
        sign_election: str,
        plan: MemoryPlan,
        merged_key: Callable[[str], bool],
    ) -> None:
        if len(models) != collector.n:
            raise ValueError(f"{len(models)} models for a report of {collector.n} inputs")
        self.collector = collector
        self.base = base
        self.n = collector.n
        self.sign_election = sign_election
        self.plan = plan
        self._merged_key = merged_key
        self._position: Dict[Any, int] = {}
        for i, model in enumerate(models):
            self._position.setdefault(model, i)
        self._lock = threading.Lock()
        self.seen: Set[str] = set()
        self._open: Dict[str, KeyRecording] = {}  # merged, awaiting the saved value
        self.resumed: List[str] = []
        self.reread_bytes = 0

    def note_resumed(self, names: Sequence[str]) -> None:
        """Merged keys a resumed merge wrote in an earlier run (this recorder never sees them)."""
        with self._lock:
            self.resumed += [n for n in names if self._merged_key(n)]

    def position(self, model: Any) -> Optional[int]:
        """The report's index of a model reference (None: the base, or not a reported input)."""
        return self._position.get(model)

    def start_key(
        self, name: str, shape: Sequence[int], readers: Mapping[Any, Optional[RowReader]], base_rows: Callable[[], RowReader]
    ) -> Optional[KeyRecording]:
        """A recording of one key's merge, or None when the report does not cover the key.
        ``base_rows()`` gives a reader of the base when the merge does not read it (linear)."""
        if not self._merged_key(name):
            return None
        if readers.get(self.base) is None:
            readers = {**readers, self.base: base_rows()}
        return KeyRecording(self, name, tuple(int(d) for d in shape), self.base, readers)

    def saved(self, name: str, value: torch.Tensor) -> None:
        """A key's value as it is written (after the cast to the save dtype): the key enters the report."""
        with self._lock:
            recording = self._open.pop(name, None)
        if recording is not None:
            recording.add_saved(value)

    def _finished(self, recording: KeyRecording) -> None:
        with self._lock:
            self._open[recording.name] = recording

    def _add(self, name: str, **values: Any) -> None:
        with self._lock:
            if name in self.seen:
                return  # a key merged twice (a retried task): its first statistics stand
            self.collector.add_key(name, **values)
            self.seen.add(name)

    def _reread(self, nbytes: int) -> None:
        with self._lock:
            self.reread_bytes += nbytes


class KeyRecording:
    """The statistics of one key, taken from the row chunks its merge reads."""

    def __init__(
        self, owner: MergeReportRecorder, name: str, shape: Tuple[int, ...], base: Any, readers: Mapping[Any, Optional[RowReader]]
    ) -> None:
        self.owner = owner
        self.name = name
        self.shape = shape
        self.rows, self.cols = rows_cols(torch.Size(shape))
        self.base = base
        self._readers = {m: r for m, r in readers.items() if r is not None}
        self._expected = set(self._readers)
        self._acc = KeyAccumulator(owner.n, owner.sign_election)
        self._next_row = 0
        self._pending: Dict[Any, Optional[torch.Tensor]] = {}
        self._pending_end: Optional[int] = None
        self._base_rows: List[torch.Tensor] = []
        self._coeffs: Optional[torch.Tensor] = None
        self._lock = threading.Lock()
        # A range is taken only if it is no longer than a float32 chunk of the merge (the plan's
        # rows for N inputs, 16 bytes per element and input): its float64 task vectors then take
        # at most half a chunk, and a pre-pass reading one input whole is not held.
        per_row = max(1, self.cols * 16 * len(self._expected))
        self._max_rows = max(1, owner.plan.chunk_bytes // per_row)

    def wrap(self, readers: Mapping[Any, Optional[RowReader]]) -> Dict[Any, Optional[RowReader]]:
        """The same readers, each offering what it reads to this recording."""
        return {m: (self._tee(m, r) if r is not None else None) for m, r in readers.items()}

    def _tee(self, model: Any, reader: RowReader) -> RowReader:
        def rows(start: int, stop: int) -> Optional[torch.Tensor]:
            value = reader(start, stop)
            self._offer(model, start, stop, value)
            return value

        return rows

    def _offer(self, model: Any, start: int, stop: int, value: Optional[torch.Tensor]) -> None:
        if model not in self._expected:
            return
        with self._lock:
            if start != self._next_row or stop <= start or stop - start > self._max_rows:
                return
            if self._pending_end is not None and stop != self._pending_end:
                return
            self._pending_end = stop
            # A copy: a kernel may work in place on rows it read (a fresh tensor from a file).
            self._pending[model] = value.detach().clone() if value is not None else None
            if len(self._pending) == len(self._expected):
                self._consume(start, stop, self._pending)
                self._pending = {}
                self._pending_end = None

    def _consume(self, start: int, stop: int, chunk: Mapping[Any, Optional[torch.Tensor]]) -> None:
        base_rows = chunk[self.base]
        if base_rows is None:
            raise ValueError(f"key {self.name}: the base gave no rows {start}:{stop}")
        base_rows = base_rows.detach().reshape(-1).cpu()
        b = base_rows.to(torch.float64)
        deltas = torch.zeros(self.owner.n, b.numel(), dtype=torch.float64)
        for model, value in chunk.items():
            position = self.owner.position(model)
            if position is None or model == self.base or value is None:
                continue  # the base, or an input abstaining here: a zero task vector
            row = deltas[position]
            row.copy_(value.detach().reshape(-1))
            row.sub_(b)
            row.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # the merge leaves such inputs out
        self._acc.update(b, deltas)
        self._base_rows.append(base_rows)
        self._next_row = stop

    def median_found(self, models: Sequence[Any]) -> Callable[[List[int], torch.Tensor], None]:
        """An ``on_median`` observer for a kernel whose model ``j`` is ``models[j]``."""

        def observe(active: List[int], coeffs: torch.Tensor) -> None:
            full = torch.zeros(self.owner.n, dtype=torch.float64)
            for j, c in zip(active, coeffs.to(device="cpu", dtype=torch.float64).tolist(), strict=True):
                position = self.owner.position(models[j])
                if position is not None:
                    full[position] += c
            # A method that takes the base as one more point (geometric_median) gives it a share;
            # the report shows the inputs' shares of the rest.
            total = float(full.sum())
            self._coeffs = full / total if total > 0 else None

        return observe

    def finish(self) -> None:
        """The key's merge is done: rows it did not read for every input together are read now;
        the key enters the report when its saved value comes (:meth:`MergeReportRecorder.saved`)."""
        step = self._max_rows
        while self._next_row < self.rows:
            start, stop = self._next_row, min(self.rows, self._next_row + step)
            chunk = {m: r(start, stop) for m, r in self._readers.items()}
            self.owner._reread(sum(v.numel() * v.element_size() for v in chunk.values() if v is not None))
            self._consume(start, stop, chunk)
        self.owner._finished(self)

    def add_saved(self, saved: torch.Tensor) -> None:
        """Add the key to the report, its block change from ``saved`` (the value as written)."""
        stats = self._acc.result()
        change_sq = 0.0
        flat = saved.detach().reshape(self.rows, self.cols) if saved.numel() else saved.reshape(-1)
        row = 0
        for base_rows in self._base_rows:
            count = base_rows.numel() // max(1, self.cols)
            change = flat[row : row + count].reshape(-1).to(device="cpu", dtype=torch.float64) - base_rows.to(torch.float64)
            change_sq += float(torch.dot(change, change))
            row += count
        self.owner._add(
            self.name,
            block_id=report_block_of(self.name),
            component=component_of(self.name),
            gram=stats.gram,
            median_coeffs=self._coeffs,
            base_norm_sq=stats.base_norm_sq,
            change_norm_sq=change_sq,
            sign_agree_fraction=stats.sign_agree_fraction,
            elements=stats.elements,
        )


def report_models(config: Any) -> List[Any]:
    """The config's non-base inputs (mergekit model references) in config order, each once:
    ``models:``, then slice sources, then those of each module (mergekit's SDXL modules)."""
    bases = {getattr(config, "base_model", None)}
    refs: List[Any] = [m.model for m in getattr(config, "models", None) or []]
    slices = list(getattr(config, "slices", None) or [])
    for module in (getattr(config, "modules", None) or {}).values():
        refs += [m.model for m in getattr(module, "models", None) or []]
        slices += list(getattr(module, "slices", None) or [])
    for piece in slices:
        bases.add(getattr(piece, "base_model", None))
        refs += [source.model for source in piece.sources]
    out: List[Any] = []
    for ref in refs:
        if ref not in bases and ref not in out:
            out.append(ref)
    return out


def input_label(model: Any) -> str:
    """A model reference as the report names it: its LoRA's file name, else its file name."""
    lora = getattr(model, "lora", None)
    path = lora.path if lora is not None else model.model.path
    return os.path.basename(str(path)) or str(path)


def reported_inputs(config: Any) -> Tuple[Any, List[Any]]:
    """``(base, models)`` a report of this config covers; ValueError without a base or an input."""
    base = getattr(config, "base_model", None)
    if base is None:
        raise ValueError("a report needs base_model (task vectors are each input minus the base)")
    models = report_models(config)
    if not models:
        raise ValueError("a report needs an input besides the base model")
    return base, models


def new_recorder(config: Any, plan: MemoryPlan, *, vae_merged: bool) -> MergeReportRecorder:
    """A recorder for the merge of a mergekit config (raises ValueError without base or inputs)."""
    base, models = reported_inputs(config)
    method = str(config.merge_method)
    shared = dict(config.parameters or {})
    election = shared.get("sign_election")
    median = method in MEDIAN_METHODS and shared.get("aggregate", "mean" if method == "ties_soup" else "median") == "median"
    collector = ReportCollector(
        [input_label(m) for m in models],
        base=os.path.basename(str(base.model.path)),
        method=method,
        statistics_from="the merge itself: the rows it read (raw task vectors X_i - B), no pass of its own",
        block_change_from="the merge's result, as saved",
        median_weight_from="the merge's own Weiszfeld coefficients per key (after its DROP, trim and sign masks)" if median else None,
    )
    return MergeReportRecorder(
        collector,
        models,
        base=base,
        sign_election=election if election in ("count", "sum") else "count",
        plan=plan,
        merged_key=lambda name: is_merged_key(name, vae_merged),
    )
