"""Execute the planned merge with mergekit's ``Executor`` and stream each key into the file.

mergekit's own writer holds a whole shard in RAM; here each merged key is written, in the
file's entry order, as soon as it and every key before it are done, so memory stays at the
keys in flight.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_sdxl.errors import InputDataError
from mergekit_sdxl.host.checkpoint import SDXLCheckpointLoader
from mergekit_sdxl.host.merge_planning import expected_read_bytes
from mergekit_sdxl.host.mergekit_api import Executor, LoaderCache
from mergekit_sdxl.host.tasks import OutputTensor
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


def bytes_read() -> int:
    """Bytes the checkpoint loaders of this process have read so far."""
    return sum(loader.bytes_read for loader in LoaderCache.loaders.values() if isinstance(loader, SDXLCheckpointLoader))


def stream_merge(
    writer: StreamingCheckpointWriter,
    targets: Sequence[Tuple[str, OutputTensor]],
    *,
    device: str,
    quiet: bool,
) -> None:
    """Run the pending ``targets`` and write every pending entry of ``writer`` in order."""
    done = set(writer.completed_names())
    pending = [(name, task) for name, task in targets if name not in done]
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
    executor = StreamingExecutor(
        [task for _, task in pending], math_device=torch.device(device), storage_device=torch.device("cpu")
    )
    with tqdm(total=expected_bytes, unit="B", unit_scale=True, desc="merging", disable=quiet) as bar:
        drain()
        for keys_done, (task, value) in enumerate(executor.run(quiet=True), start=1):
            buffered[task.name] = value
            drain()
            bar.update(max(0, min(bytes_read() - start, expected_bytes) - bar.n))
            bar.set_postfix_str(f"keys {keys_done}/{len(pending)} {task.name[-40:]}", refresh=False)
        drain()
    if position != len(order):
        raise InputDataError(f"the merge produced no value for {order[position]}")

