"""Execute the planned merge with mergekit's ``Executor`` and stream each key into the file.

mergekit's own writer holds a whole shard in RAM; here each merged key is written, in the
file's entry order, as soon as it and every key before it are done, so memory stays at the
keys in flight.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_sdxl.errors import InputDataError
from mergekit_sdxl.host.checkpoint import SDXLCheckpointLoader
from mergekit_sdxl.host.merge_planning import expected_read_bytes, models_of
from mergekit_sdxl.host.merge_report import active_recorder
from mergekit_sdxl.host.mergekit_api import Executor, LoaderCache
from mergekit_sdxl.host.tasks import LANE_DEVICE, MergeKeyTask, OutputTensor
from mergekit_sdxl.io.writer import StreamingCheckpointWriter


class _TargetList(list):
    """A list of task handles with O(1) membership: ``Executor`` tests ``handle in
    self.targets`` once per task, millions of pydantic ``__eq__`` calls against a list of 2515."""

    def __init__(self, handles: Iterable[Any]) -> None:
        super().__init__(handles)
        self._members = set(self)

    def __contains__(self, item: object) -> bool:
        return item in self._members


class StreamingExecutor(Executor):
    """mergekit's ``Executor`` with O(1) target lookup; used through its public ``run``."""

    targets: List[Any]  # a _TargetList of mergekit's task handles

    def __init__(self, targets: Sequence[Any], **kwargs: Any) -> None:
        super().__init__(list(targets), **kwargs)
        self.targets = _TargetList(self.targets)


# Read-ahead hint per input of an upcoming key: enough for the key's first chunks, not so much
# that hints for a huge key push the current key's pages out of the cache.
_PREFETCH_BYTES = 64 * 1024 * 1024
_LOOKAHEAD_KEYS = 2


def prefetch(name: str, target: OutputTensor) -> None:
    """Ask the OS to read the start of ``name``'s byte range in every input of ``target`` now,
    so the disk works while the current key is computed (a hint; reads stay where they are)."""
    for model in models_of(target.tensor_task):
        loader = LoaderCache().get(model)
        advise = getattr(loader, "advise", None)
        ranges = getattr(loader.index, "byte_ranges", {})
        shapes = getattr(loader.index, "stored_shapes", {})
        if advise is None or name not in ranges:
            continue
        start, stop = ranges[name]
        shape = shapes.get(name, ())
        rows = shape[0] if shape else 1
        row_bytes = max(1, (stop - start) // max(1, rows))
        advise(name, 0, max(1, _PREFETCH_BYTES // row_bytes))


def bytes_read() -> int:
    """Bytes the checkpoint loaders of this process have read so far."""
    return sum(loader.bytes_read for loader in LoaderCache.loaders.values() if isinstance(loader, SDXLCheckpointLoader))


def stream_merge(
    writer: StreamingCheckpointWriter,
    targets: Sequence[Tuple[str, OutputTensor]],
    *,
    device: str,
    quiet: bool,
    devices: Optional[Sequence[str]] = None,
) -> None:
    """Run the pending ``targets`` and write every pending entry of ``writer`` in order.

    ``devices`` (``--multi-gpu``): one lane per device, key i on lane i mod len(devices), each
    lane at most ``_LANE_WINDOW`` keys ahead of the writer, so memory stays bounded; every key
    is computed exactly as on one device of that kind, so the bytes do not change.
    """
    done = set(writer.completed_names())
    pending = [(name, task) for name, task in targets if name not in done]
    recorder = active_recorder()
    if recorder is not None:  # merged keys an earlier run wrote: the report must get them elsewhere
        recorder.note_resumed(
            [name for name, task in targets if name in done and isinstance(task.tensor_task, MergeKeyTask)]
        )
    expected_bytes = expected_read_bytes(pending)
    order = writer.pending_names()
    planned = {name for name, _ in pending}
    # Entries no task produces (v_pred/ztsnr markers): empty float32 tensors.
    buffered: Dict[str, Optional[torch.Tensor]] = {
        name: torch.empty(0, dtype=torch.float32) for name in order if name not in planned
    }
    position = 0

    def drain() -> None:
        nonlocal position
        while position < len(order) and order[position] in buffered:
            name = order[position]
            writer.write(name, buffered.pop(name))  # type: ignore[arg-type]
            position += 1

    start = bytes_read()
    with tqdm(total=expected_bytes, unit="B", unit_scale=True, desc="merging", disable=quiet) as bar:
        drain()
        for name, task in pending[:_LOOKAHEAD_KEYS]:
            prefetch(name, task)
        results = (
            _run_lanes(pending, list(devices))
            if devices and len(devices) > 1
            else _run_one(pending, device)
        )
        for keys_done, (name, value) in enumerate(results, start=1):
            if keys_done + _LOOKAHEAD_KEYS - 1 < len(pending):
                prefetch(*pending[keys_done + _LOOKAHEAD_KEYS - 1])
            buffered[name] = value
            drain()
            bar.update(max(0, min(bytes_read() - start, expected_bytes) - bar.n))
            bar.set_postfix_str(f"keys {keys_done}/{len(pending)} {name[-40:]}", refresh=False)
        drain()
    if position != len(order):
        raise InputDataError(f"the merge produced no value for {order[position]}")


def _run_one(pending: Sequence[Tuple[str, OutputTensor]], device: str) -> Iterator[Tuple[str, Any]]:
    executor = StreamingExecutor(
        [task for _, task in pending], math_device=torch.device(device), storage_device=torch.device("cpu")
    )
    for task, value in executor.run(quiet=True):
        yield task.name, value


# How many keys a lane may run ahead of the writer (its finished keys wait in memory).
_LANE_WINDOW = 8


def _run_lanes(pending: Sequence[Tuple[str, OutputTensor]], devices: List[str]) -> Iterator[Tuple[str, Any]]:
    """Keys spread over one thread per device; yields (name, value) as lanes finish them. A lane
    starts key n only while n - frontier <= _LANE_WINDOW, frontier being the first key not yet
    finished: the lane owning the frontier key never waits, and at most about
    ``_LANE_WINDOW`` finished keys wait for it."""
    results: queue.Queue[Tuple[str, Any, Optional[BaseException]]] = queue.Queue()
    stop = threading.Event()
    progress = threading.Condition()
    index = {name: i for i, (name, _) in enumerate(pending)}
    finished = [False] * len(pending)
    frontier = 0
    lanes = [[pending[i] for i in range(g, len(pending), len(devices))] for g in range(len(devices))]

    def lane(keys: Sequence[Tuple[str, OutputTensor]], device: str, number: int) -> None:
        LANE_DEVICE.set(device)
        try:
            for name, value in _run_one(keys, device):
                results.put((name, value, None))
                following = index[name] + len(devices)
                with progress:
                    # mergekit's executor may finish a lane's keys out of list order: the lane
                    # that owns the (unfinished) frontier key never waits, or all lanes would.
                    while (
                        not stop.is_set()
                        and following - frontier > _LANE_WINDOW
                        and frontier % len(devices) != number
                    ):
                        progress.wait(timeout=0.5)
                if stop.is_set():
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which raises it
            results.put(("", None, error))

    threads = [
        # Each lane runs in a copy of this context: it sees the merge's report recorder, if any.
        threading.Thread(
            target=contextvars.copy_context().run,
            args=(lane, keys, device, number),
            name=f"mergekit-sdxl-lane-{number}-{device}",
            daemon=True,
        )
        for number, (keys, device) in enumerate(zip(lanes, devices, strict=True))
        if keys
    ]
    for thread in threads:
        thread.start()
    try:
        for _ in range(len(pending)):
            name, value, error = results.get()
            if error is not None:
                raise error
            with progress:
                finished[index[name]] = True
                while frontier < len(pending) and finished[frontier]:
                    frontier += 1
                progress.notify_all()
            yield name, value
    finally:
        stop.set()
        with progress:
            progress.notify_all()
        for thread in threads:
            thread.join()
