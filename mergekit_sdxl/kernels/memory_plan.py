"""The memory plan of one merge: budget, working-set rule, chunk rows, threads.

One immutable object, made once per merge from ``--memory-budget`` and carried by the tasks
that merge each key; nothing about memory lives in module globals. The working-set rule is
the only place that says how much memory a key costs:

- this plugin's methods (``stored_itemsize`` given) compute in row chunks whatever the source:
  a key is read whole, once, when its N inputs in their stored dtype take at most 3/8 of the
  budget (``numel * stored_itemsize * N``); otherwise row chunks are read straight from the
  files, and up to 3/8 of the budget of the chunks read by the first pass is kept for the second
  (``reuse_bytes``), so only the rest is read twice. 3/8, not 1/2: the chunk's working set
  (1/4) and the kernel's reused scratch buffers come on top, and the process itself (torch,
  mergekit, numba) takes ~0.45 GB that no budget can shrink;
- mergekit's own methods merged whole upcast their N inputs and make about three more copies
  (masks, signs, the running result): ``numel * itemsize * (N + 3)`` must be at most half the
  budget;
- a chunk holds about four compute-dtype copies per input: ``rows * cols * itemsize * 4 * N``,
  at most a quarter of the budget.

Chunking never changes the bytes of the result (the kernels reduce in a fixed order), so a
plan only decides memory and speed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from mergekit_sdxl.kernels.tgmd import rows_cols

_MiB = 1024 * 1024

# Below this many elements a key is merged on one thread: its hundreds of small tensor ops cost
# more in OpenMP fork/join and spin-waits than they gain (5-13x slower on 2 busy cores,
# docs/benchmarks.md). Results do not depend on the thread count.
SMALL_TENSOR_ELEMENTS = 1 << 20

# The kernels' chunk bound when no budget is given (mergekit-yaml, the Python API).
DEFAULT_CHUNK_BYTES = 256 * _MiB


def compute_dtype_for(dtype: Optional[torch.dtype]) -> torch.dtype:
    """float64 when the config asks for it, float32 otherwise (never fp16/bf16 math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 8


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n


@dataclass(frozen=True)
class MemoryPlan:
    """How one merge uses memory. ``budget_bytes`` None: no budget (nothing is chunked from
    the files; the kernels still work in chunks of ``chunk_bytes``)."""

    budget_bytes: Optional[int] = None
    # Whether the plan may change torch's (process-wide) intra-op thread count per key: only
    # when one executor thread runs the merge (mergekit-sdxl merge), never under mergekit's
    # multi-GPU executor, which runs tasks in threads.
    adjust_threads: bool = False

    @property
    def chunk_bytes(self) -> int:
        """Bound on one chunk's working set."""
        if self.budget_bytes is None:
            return DEFAULT_CHUNK_BYTES
        return max(self.budget_bytes // 4, _MiB)

    def whole_tensor_bytes(self, shape: Sequence[int], n_inputs: int, compute_dtype: torch.dtype) -> int:
        """Working set of a key merged whole (see the module docstring)."""
        return _numel(shape) * _itemsize(compute_dtype) * (n_inputs + 3)

    def merge_whole(
        self, shape: Sequence[int], n_inputs: int, compute_dtype: torch.dtype, stored_itemsize: Optional[int] = None
    ) -> bool:
        """True when the key's N inputs are loaded whole; False: row chunks from the files.
        ``stored_itemsize``: the inputs' largest stored item size, for methods that compute in
        chunks from whole stored inputs (see the module docstring)."""
        if self.budget_bytes is None:
            return True
        if stored_itemsize is not None:
            return _numel(shape) * stored_itemsize * n_inputs <= self._kept_bytes
        return self.whole_tensor_bytes(shape, n_inputs, compute_dtype) <= self.budget_bytes // 2

    @property
    def reuse_bytes(self) -> int:
        """Bytes of first-pass chunks a key read from the files may keep for its second pass."""
        return 0 if self.budget_bytes is None else self._kept_bytes

    @property
    def _kept_bytes(self) -> int:
        # Stored inputs a key may hold across its two passes (see the module docstring).
        return (self.budget_bytes or 0) * 3 // 8

    def rows_per_chunk(self, shape: Sequence[int], n_inputs: int, compute_dtype: torch.dtype) -> int:
        """Rows per chunk so that N inputs, about four compute-dtype copies each, fit a chunk."""
        rows, cols = rows_cols(torch.Size(shape))
        per_row = max(1, n_inputs) * cols * _itemsize(compute_dtype) * 4
        return max(1, min(rows, self.chunk_bytes // per_row))

    def peak_bytes(
        self,
        shape: Sequence[int],
        n_inputs: int,
        compute_dtype: torch.dtype,
        out_dtype: torch.dtype,
        stored_itemsize: Optional[int] = None,
    ) -> int:
        """Estimated working memory of merging this key (plus its output tensor)."""
        out = _numel(shape) * _itemsize(out_dtype)
        if stored_itemsize is not None:
            if self.merge_whole(shape, n_inputs, compute_dtype, stored_itemsize):
                return _numel(shape) * stored_itemsize * n_inputs + self.chunk_bytes + out
            return self.reuse_bytes + self.chunk_bytes + out
        if self.merge_whole(shape, n_inputs, compute_dtype):
            return self.whole_tensor_bytes(shape, n_inputs, compute_dtype) + out
        return self.chunk_bytes + out

    @contextmanager
    def threads_for(self, numel: int) -> Iterator[None]:
        """One intra-op thread for small keys (when the plan may adjust threads)."""
        configured = torch.get_num_threads()
        if not self.adjust_threads or numel >= SMALL_TENSOR_ELEMENTS or configured == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(configured)
