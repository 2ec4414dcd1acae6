"""Streaming single-file safetensors writer with optional crash-safe resume.

The header (names, dtypes, shapes, offsets, ``__metadata__``) is fully determined by
the entry list, so it is written first and tensor data follows sequentially in entry
order. Nothing but the running sha256 is kept between tensors, so memory stays at one
tensor however large the model. Output bytes depend only on the inputs (deterministic
JSON), which is what makes "resume to the identical file" checkable.

Layout on disk while writing: ``<out>.partial`` (data) and, with ``journal=True``,
``<out>.partial.journal``. ``close()`` verifies the temp file and renames it onto
``<out>``; nothing ever appears at ``<out>`` unless it is complete.

Metadata known only at the end (the inputs' sha256, hashed while the merge runs): the header is
written with same-length placeholders, and ``close(final_metadata=...)`` writes the final header
over it in place (it must have the same length, so no data moves) before verifying. The published
sha256 is then read back from disk, and the data is checked against the hash streamed while
writing, in the same single read (see ``_verified_digest``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch

from mergekit_sdxl.errors import OutputError
from mergekit_sdxl.io.hashing import autov2
from mergekit_sdxl.io.journal import (
    JournalError,
    JournalState,
    ResumeMismatch,
    describe_fingerprint_change,
    fsync_dir,
    read_journal,
    remove_quietly,
    write_journal,
)
from mergekit_sdxl.io.safe_write import create_exclusive, describe_os_error, open_existing_nofollow
from mergekit_sdxl.io.signals import signals_deferred, signals_held
from mergekit_sdxl.sdxl.dtypes import torch_dtypes
from mergekit_sdxl.sdxl.header import MAX_HEADER_SIZE

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "DTYPE_NAMES",
    "TORCH_DTYPES",
    "ResumeMismatch",
    "StreamingCheckpointWriter",
    "TensorEntrySpec",
    "WriteResult",
    "build_header",
    "journal_path_for",
    "temp_path_for",
]

_MiB = 1024 * 1024
_HASH_CHUNK = 16 * _MiB

# Both directions of the one dtype table (mergekit_sdxl.sdxl.dtypes), for the dtypes this torch
# has; kept as module names because callers import them from here.
# safetensors dtype name -> torch dtype (manifests and headers speak in these names).
TORCH_DTYPES: Dict[str, torch.dtype] = torch_dtypes()
# torch dtype -> safetensors dtype name.
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


class TensorEntrySpec(NamedTuple):
    """One tensor of the output: its key, dtype and shape (``()`` for 0-d).

    ``dtype`` may also be a safetensors name such as ``"F16"``; it is normalized to torch.
    """

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]


class WriteResult(NamedTuple):
    """The finished file: final path, hex sha256, AutoV2 short hash, size in bytes."""

    path: Path
    sha256: str
    autov2: str
    size: int


def temp_path_for(out_path: PathLike) -> Path:
    """Where the data of ``out_path`` is written until it is complete: ``OUT.partial``."""
    out = Path(out_path)
    return out.with_name(out.name + ".partial")


def journal_path_for(temp_path: PathLike) -> Path:
    """The resume journal beside a temp file: ``OUT.partial.journal``."""
    temp = Path(temp_path)
    return temp.with_name(temp.name + ".journal")


def _nbytes(spec: TensorEntrySpec) -> int:
    n = 1
    for d in spec.shape:
        n *= d
    return n * spec.dtype.itemsize


def _normalize(entries: Sequence[TensorEntrySpec]) -> List[TensorEntrySpec]:
    out: List[TensorEntrySpec] = []
    seen = set()
    for e in entries:
        name, dtype, shape = e
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        if isinstance(dtype, str):  # accept safetensors names ("F16") as manifests use them
            if dtype not in TORCH_DTYPES:
                raise ValueError(f"{name}: unknown safetensors dtype {dtype!r}")
            dtype = TORCH_DTYPES[dtype]
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written (safetensors float, integer and bool dtypes only)")
        shape_t = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape_t):
            raise ValueError(f"{name}: negative dimension in shape {shape_t}")
        out.append(TensorEntrySpec(name, dtype, shape_t))
    return out


def build_header(entries: Sequence[TensorEntrySpec], metadata: Optional[Mapping[str, str]]) -> bytes:
    """Safetensors header bytes (8-byte LE length + space-padded JSON) for ``entries`` in order.

    Deterministic: ``__metadata__`` first with sorted keys, then tensors in the given
    order, compact separators, UTF-8. Padding makes the data start 8-byte aligned.
    """
    header: Dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must be str -> str, got {k!r}: {type(v).__name__}")
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for e in _normalize(entries):
        end = offset + _nbytes(e)
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of ``tensor`` as a zero-copy view where possible."""
    t = tensor.detach().cpu().contiguous()
    # Viewing as uint8 avoids numpy dtypes altogether (numpy has no bfloat16/float8);
    # reshape(-1) makes 0-d tensors viewable.
    # numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only; it is a buffer on 3.10 too.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _write_all(fh, data: memoryview) -> None:
    """Write every byte to an unbuffered file (raw writes may be partial)."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while view:
        n = fh.write(view)
        view = view[n:]


def _hash_twice(path: Path, length: int, streamed_header: bytes) -> Tuple[str, str, bytes]:
    """One read of the first ``length`` bytes of ``path``: (sha256 of those bytes, sha256 of the same
    bytes with their first ``len(streamed_header)`` replaced by ``streamed_header``, the header
    bytes read). The second is fed in a helper thread: the two hashes take one hash's wall time
    where a second core is free."""
    import queue

    from mergekit_sdxl.io.background_hash import start_thread_without_signals

    head = len(streamed_header)
    on_disk, streamed = hashlib.sha256(), hashlib.sha256(streamed_header)
    chunks: queue.Queue = queue.Queue()

    def feed() -> None:
        while True:
            chunk = chunks.get()
            if chunk is None:
                return
            streamed.update(chunk)
            chunks.task_done()

    helper = start_thread_without_signals(feed, "mergekit-sdxl-verify")
    buf = bytearray(min(_HASH_CHUNK, max(length, 1)))
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as fh:
            header = fh.read(head)
            if len(header) != head:
                raise EOFError(f"{path} is shorter than its header")
            on_disk.update(header)
            remaining = length - head
            while remaining:
                n = fh.readinto(view[: min(len(buf), remaining)])
                if not n:
                    raise EOFError(f"{path} is shorter than {length} bytes")
                chunks.put(view[:n])
                on_disk.update(view[:n])
                chunks.join()  # the helper is done with the buffer before it is read into again
                remaining -= n
    finally:
        chunks.put(None)
        helper.join()
    return on_disk.hexdigest(), streamed.hexdigest(), header


def _overwrite_header(path: Path, header: bytes) -> None:
    """Write ``header`` over the first ``len(header)`` bytes of ``path`` (no data moves) and sync."""
    fh = open_existing_nofollow(path)
    try:
        fh.seek(0)
        _write_all(fh, memoryview(header))
        fh.flush()
        os.fsync(fh.fileno())
    finally:
        fh.close()


def _hash_prefix(path: Path, length: int) -> hashlib._Hash:
    """sha256 object fed the first ``length`` bytes of ``path`` (raises if the file is shorter)."""
    h = hashlib.sha256()
    buf = bytearray(min(_HASH_CHUNK, max(length, 1)))
    view = memoryview(buf)
    remaining = length
    with open(path, "rb", buffering=0) as fh:
        while remaining:
            n = fh.readinto(view[: min(len(buf), remaining)])
            if not n:
                raise EOFError(f"{path} is shorter than {length} bytes")
            h.update(view[:n])
            remaining -= n
    return h


class StreamingCheckpointWriter:
    """Write one safetensors file tensor by tensor, in a fixed order, hashing as it goes.

    Use as a context manager (an exception inside the block aborts; a clean exit closes)
    or call ``write`` for each entry then ``close``. With ``journal=True`` progress is
    checkpointed so ``open_or_resume`` can continue after a crash to the identical file.
    """

    def __init__(
        self,
        out_path: PathLike,
        entries: Sequence[TensorEntrySpec],
        metadata: Optional[Mapping[str, str]] = None,
        *,
        temp_path: Optional[PathLike] = None,
        journal: bool = False,
        fingerprint: str = "",
        journal_every_bytes: int = 16 * _MiB,
        journal_every_s: float = 5.0,
    ) -> None:
        """Start a fresh write (any existing temp file and journal are discarded).

        ``journal_every_bytes`` / ``journal_every_s``: after a tensor completes, the journal
        is rewritten once either this many bytes or seconds have passed since the last
        checkpoint (0 and 0: after every tensor). Each checkpoint costs an fsync, so this
        bounds both the fsync count on fast writes and the work lost on slow merges.
        """
        self._setup(out_path, entries, metadata, temp_path, journal, fingerprint, journal_every_bytes, journal_every_s)
        self._start_fresh()

    @classmethod
    def open_or_resume(
        cls: Type[StreamingCheckpointWriter],
        out_path: PathLike,
        entries: Sequence[TensorEntrySpec],
        metadata: Optional[Mapping[str, str]],
        fingerprint: str,
        restart: bool = False,
        *,
        temp_path: Optional[PathLike] = None,
        journal_every_bytes: int = 16 * _MiB,
        journal_every_s: float = 5.0,
        alternate_metadata: Optional[Callable[[], Optional[Mapping[str, str]]]] = None,
    ) -> StreamingCheckpointWriter:
        """Resume a journaled partial write of the same output if one exists, else start fresh.

        Raises ``ResumeMismatch`` when the partial output was made with another fingerprint
        or header, unless ``restart`` (then the partial output is discarded). An unreadable
        journal or a temp file that fails verification is discarded with a warning.
        Call ``completed_names()`` to learn which entries to skip.

        ``alternate_metadata``: the other metadata a partial output of this same merge may have been
        started with (the placeholder or the final version of ``metadata``, whichever ``metadata``
        is not); called only when the partial's header is not ``metadata``'s. A partial started
        with it is resumed as it is (its header is replaced at ``close(final_metadata=...)``).
        """
        self = cls.__new__(cls)
        self._setup(out_path, entries, metadata, temp_path, True, fingerprint, journal_every_bytes, journal_every_s)
        self._alternate = alternate_metadata
        if restart or not self._try_resume():
            self._start_fresh()
        return self

    # ------------------------------------------------------------------ setup

    def _setup(
        self,
        out_path: PathLike,
        entries: Sequence[TensorEntrySpec],
        metadata: Optional[Mapping[str, str]],
        temp_path: Optional[PathLike],
        journal: bool,
        fingerprint: str,
        journal_every_bytes: int,
        journal_every_s: float,
    ) -> None:
        if sys.byteorder != "little":
            # safetensors is little-endian; byte-swapping every dtype is not worth supporting.
            raise NotImplementedError("StreamingCheckpointWriter requires a little-endian host")
        self.out_path = Path(out_path)
        self.temp_path = Path(temp_path) if temp_path is not None else temp_path_for(self.out_path)
        if self.temp_path.resolve() == self.out_path.resolve():
            raise ValueError("temp_path must differ from out_path")
        self.journal_path: Optional[Path] = journal_path_for(self.temp_path) if journal else None
        self.fingerprint = fingerprint
        self._entries = _normalize(entries)
        self._metadata = dict(metadata or {})
        self._header = build_header(self._entries, self._metadata)
        self._header_sha256 = hashlib.sha256(self._header).hexdigest()
        self._total_size = len(self._header) + sum(_nbytes(e) for e in self._entries)
        self._journal_every_bytes = journal_every_bytes
        self._journal_every_s = journal_every_s
        self._fh: Optional[BinaryIO] = None
        self._hasher = hashlib.sha256()
        self._index = 0  # entries fully written (and hashed)
        self._offset = 0  # file offset where those entries end
        self._resumed_from = 0
        self._last_ckpt_offset = 0
        self._last_ckpt_time = time.monotonic()
        self._failed = False  # a write died mid-tensor: the file position is unknown
        self._closed = False
        self._alternate: Optional[Callable[[], Optional[Mapping[str, str]]]] = None
        self.result: Optional[WriteResult] = None

    def _start_fresh(self) -> None:
        self.temp_path.parent.mkdir(parents=True, exist_ok=True)
        if self.journal_path is not None:
            # Remove the old journal before touching the temp file: a stale journal beside
            # new bytes would be caught by the prefix hash, but never having one is cleaner.
            remove_quietly(self.journal_path)
            fsync_dir(self.journal_path.parent)
            self._remove_stale_journal_temps()
        # Unlinking a planted symlink removes the link only; the exclusive create then
        # guarantees the bytes go to a new file of ours. Unbuffered: a writer dropped without
        # close must hold no pending bytes that a late finalizer could flush over a resumed file.
        remove_quietly(self.temp_path)
        self._fh = create_exclusive(self.temp_path)
        self._write_or_fail(memoryview(self._header))
        self._hasher = hashlib.sha256(self._header)
        self._index = 0
        self._offset = len(self._header)
        self._resumed_from = 0
        if self.journal_path is not None:
            self.checkpoint()

    def _remove_stale_journal_temps(self) -> None:
        # A crash inside a journal rewrite leaves its uniquely named temp file behind.
        assert self.journal_path is not None
        for stale in self.journal_path.parent.glob(f".{self.journal_path.name}.*.tmp"):
            remove_quietly(stale)

    def _try_resume(self) -> bool:
        """Reopen the temp file at the journal's offset; False means start fresh."""
        assert self.journal_path is not None
        if not self.journal_path.exists():
            if self.temp_path.exists():
                logger.info("%s has no journal; starting %s from scratch", self.temp_path, self.out_path)
            return False
        try:
            state = read_journal(self.journal_path)
        except JournalError as exc:
            logger.warning("%s; starting %s from scratch", exc, self.out_path)
            return False
        if state.fingerprint != self.fingerprint:
            raise ResumeMismatch(
                f"a partial output {self.temp_path} exists from a run with a different configuration or inputs "
                f"({describe_fingerprint_change(state.fingerprint, self.fingerprint)}). "
                "Pass --restart (restart=True) to discard it and start over."
            )
        if not self.temp_path.exists():
            # Also the state after a crash between close()'s rename and its journal removal,
            # in which case out_path is already complete; the window is tiny, so just say so.
            logger.warning(
                "journal %s has no temp file %s%s; starting from scratch",
                self.journal_path,
                self.temp_path,
                f" ({self.out_path} exists and may be complete)" if self.out_path.exists() else "",
            )
            return False
        if self.temp_path.is_symlink() or not self.temp_path.is_file():
            logger.warning("%s is not a regular file; starting %s from scratch", self.temp_path, self.out_path)
            return False
        old_header = self._read_temp_header()
        if not self._adopt_partial_header(old_header, state.header_sha256):
            raise ResumeMismatch(
                f"a partial output {self.temp_path} exists with the same fingerprint but a different layout "
                f"({self._describe_header_change(old_header)}). "
                "Pass --restart (restart=True) to discard it and start over."
            )
        expected_offset = len(self._header) + sum(_nbytes(e) for e in self._entries[: state.completed])
        if state.total_entries != len(self._entries) or state.offset != expected_offset:
            logger.warning("journal %s is inconsistent with the entry list; starting from scratch", self.journal_path)
            return False
        try:
            hasher = _hash_prefix(self.temp_path, state.offset)
        except (OSError, EOFError) as exc:
            logger.warning("cannot resume from %s (%s); starting from scratch", self.temp_path, exc)
            return False
        if hasher.hexdigest() != state.prefix_sha256:
            logger.warning("%s does not match its journal (prefix sha256 differs); starting from scratch", self.temp_path)
            return False
        # Bytes past the journal's offset may be a torn tensor or unsynced data: drop them.
        fh = open_existing_nofollow(self.temp_path)
        try:
            fh.truncate(state.offset)
            fh.seek(state.offset)
        except BaseException:
            fh.close()
            raise
        self._remove_stale_journal_temps()
        self._fh = fh
        self._hasher = hasher
        self._index = self._resumed_from = state.completed
        self._offset = self._last_ckpt_offset = state.offset
        logger.warning(
            "resuming: %d of %d tensors done (%.1f MiB of %s already written)",
            state.completed,
            len(self._entries),
            state.offset / _MiB,
            self.out_path,
        )
        return True

    def _adopt_partial_header(self, on_disk: bytes, journaled_sha256: str) -> bool:
        """Continue with the header the journal's prefix hash was taken over: ours, or the alternate
        one. False when the partial's header is neither (another layout: refuse to resume)."""
        candidates = [(self._header, self._metadata)]
        if (on_disk != self._header or journaled_sha256 != self._header_sha256) and self._alternate is not None:
            alternate = self._alternate()
            if alternate is not None:
                candidates.append((build_header(self._entries, alternate), dict(alternate)))
        if on_disk not in [header for header, _ in candidates]:
            return False
        by_journal = [c for c in candidates if hashlib.sha256(c[0]).hexdigest() == journaled_sha256]
        header, metadata = by_journal[0] if by_journal else next(c for c in candidates if c[0] == on_disk)
        if header != on_disk:
            if len(header) != len(on_disk):
                return False
            # Killed inside close() after the final header was written over the placeholders: the
            # journal's prefix hash is over the header it was streamed with, so put that one back.
            _overwrite_header(self.temp_path, header)
            logger.info("%s: restored the header its journal was written with", self.temp_path)
        self._header, self._metadata = header, metadata
        self._header_sha256 = hashlib.sha256(header).hexdigest()
        return True

    def _read_temp_header(self) -> bytes:
        try:
            with open(self.temp_path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    return head
                n = int.from_bytes(head, "little")
                # safetensors caps headers at 100 MB; a garbage length must not make us read GBs.
                return head + fh.read(min(n, MAX_HEADER_SIZE))
        except OSError:
            return b""

    def _describe_header_change(self, old: bytes) -> str:
        try:
            old_obj = json.loads(old[8:].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return "the existing header is unreadable"
        new_obj = json.loads(self._header[8:].decode("utf-8"))
        if old_obj.get("__metadata__") != new_obj.get("__metadata__"):
            om, nm = old_obj.get("__metadata__") or {}, new_obj.get("__metadata__") or {}
            keys = sorted(k for k in set(om) | set(nm) if om.get(k) != nm.get(k))
            return "metadata changed: " + ", ".join(keys)
        old_names = [k for k in old_obj if k != "__metadata__"]
        new_names = [k for k in new_obj if k != "__metadata__"]
        for a, b in zip(old_names, new_names, strict=False):  # a count change is reported below
            if a != b:
                return f"tensor order differs at {a!r} vs {b!r}"
            if old_obj[a] != new_obj[b]:
                return f"tensor {a!r} changed: {old_obj[a]} -> {new_obj[b]}"
        return f"tensor count changed: {len(old_names)} -> {len(new_names)}"

    # ------------------------------------------------------------------ public API

    @property
    def entries(self) -> List[TensorEntrySpec]:
        """The entry list, in file order."""
        return list(self._entries)

    def completed_names(self) -> List[str]:
        """Names already on disk (after a resume, plus any written since); callers skip these."""
        return [e.name for e in self._entries[: self._index]]

    def pending_names(self) -> List[str]:
        """Names still to be written, in the order ``write`` expects them."""
        return [e.name for e in self._entries[self._index :]]

    @property
    def bytes_remaining(self) -> int:
        """Bytes still to be written to the temp file."""
        return self._total_size - self._offset

    @property
    def resumed_from(self) -> int:
        """How many entries were already on disk when this writer opened (0 for a fresh write)."""
        return self._resumed_from

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as entry ``name``, which must be the next entry in order."""
        if self._closed:
            raise RuntimeError(f"writer for {self.out_path} is closed")
        if self._failed:
            raise RuntimeError(f"an earlier write to {self.temp_path} failed; the writer must be aborted")
        if self._index >= len(self._entries):
            raise ValueError(f"unexpected tensor {name!r}: all {len(self._entries)} entries are already written")
        spec = self._entries[self._index]
        if name != spec.name:
            raise ValueError(f"out-of-order tensor: expected {spec.name!r} (entry {self._index}), got {name!r}")
        if tensor.dtype != spec.dtype:
            raise ValueError(f"{name}: dtype {tensor.dtype} does not match the declared {spec.dtype}")
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match the declared {spec.shape}")
        data = _tensor_bytes(tensor)
        with signals_held():  # an interrupt lands before or after this tensor, never inside
            self._write_or_fail(data)
            self._hasher.update(data)
            del data  # drop the view (and with it the tensor) before any slow checkpoint I/O
            self._index += 1
            self._offset += _nbytes(spec)
        if self.journal_path is not None and (
            self._offset - self._last_ckpt_offset >= self._journal_every_bytes
            or time.monotonic() - self._last_ckpt_time >= self._journal_every_s
        ):
            self.checkpoint()

    def _write_or_fail(self, data: memoryview) -> None:
        try:
            _write_all(self._fh, data)
        except BaseException as error:
            # Part of the data may be on disk; only abort (which keeps the journaled prefix) is safe.
            self._failed = True
            if isinstance(error, OSError):
                raise OutputError(describe_os_error(error, self.temp_path) + "; the partial output is kept for resuming") from error
            raise

    def checkpoint(self) -> None:
        """Make the completed entries durable and record them in the journal (no-op without one)."""
        if self.journal_path is None or self._fh is None:
            return
        # Order matters for crash safety: data reaches the disk before the journal claims it.
        self._fh.flush()
        os.fsync(self._fh.fileno())
        write_journal(
            self.journal_path,
            JournalState(
                fingerprint=self.fingerprint,
                header_sha256=self._header_sha256,
                total_entries=len(self._entries),
                completed=self._index,
                offset=self._offset,
                prefix_sha256=self._hasher.copy().hexdigest(),
            ),
        )
        self._last_ckpt_offset = self._offset
        self._last_ckpt_time = time.monotonic()

    def close(
        self,
        before_publish: Optional[Callable[[WriteResult], object]] = None,
        *,
        final_metadata: Optional[Mapping[str, str]] = None,
    ) -> WriteResult:
        """Finish: fsync, verify the temp file and its bytes on disk, rename it onto ``out_path``,
        drop the journal.

        ``before_publish`` is called with the verified result just before the rename (sidecars
        are written there, so that the output never appears without them). ``final_metadata``
        replaces the metadata the header was written with (placeholders for values known only
        now); its header must have the same length (``ValueError`` otherwise, before any change).
        """
        if self._closed:
            if self.result is None:
                raise RuntimeError(f"writer for {self.out_path} was aborted")
            return self.result
        try:
            if self._failed:
                raise RuntimeError(f"an earlier write to {self.temp_path} failed")
            if self._index != len(self._entries):
                missing = self._entries[self._index]
                raise ValueError(
                    f"cannot close {self.out_path}: {len(self._entries) - self._index} of {len(self._entries)} "
                    f"entries not written (next: {missing.name!r})"
                )
            final = self._final_header(final_metadata)
            fh = self._fh
            assert fh is not None  # open from construction until close or abort (which sets _closed)
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            self._fh = None
            if final != self._header:
                # The journal still describes the placeholder header: a crash from here on resumes
                # (the resume puts that header back) rather than leaving a file nobody can check.
                _overwrite_header(self.temp_path, final)
            self._verify(final_metadata if final_metadata is not None else self._metadata)
            digest = self._verified_digest(final)
            result = WriteResult(self.out_path, digest, autov2(digest), self._total_size)
            with signals_deferred():
                if before_publish is not None:
                    before_publish(result)
                os.replace(self.temp_path, self.out_path)
                fsync_dir(self.out_path.parent)
                if self.journal_path is not None:
                    remove_quietly(self.journal_path)
                self._closed = True
        except BaseException as error:
            self.abort()
            if isinstance(error, OSError) and not isinstance(error, OutputError):
                raise OutputError(describe_os_error(error, self.out_path)) from error
            raise
        self.result = result
        logger.info("wrote %s (%d bytes, sha256 %s)", self.out_path, self._total_size, digest)
        return self.result

    def abort(self, discard: bool = False) -> None:
        """Stop writing; never leaves a file at ``out_path``.

        With a journal the temp file is checkpointed and kept for ``open_or_resume``
        unless ``discard``; without one it is deleted.
        """
        if self._closed:
            return
        self._closed = True
        keep = self.journal_path is not None and not discard
        if self._fh is not None:
            if keep:
                try:
                    # Save progress made since the last checkpoint (e.g. on Ctrl-C).
                    self.checkpoint()
                except Exception as exc:  # disk full etc.: the previous journal is still valid
                    logger.warning("could not checkpoint %s on abort: %s", self.temp_path, exc)
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
        if keep:
            logger.info("kept partial output %s for resume", self.temp_path)
            return
        remove_quietly(self.temp_path)
        if self.journal_path is not None:
            remove_quietly(self.journal_path)

    def _final_header(self, final_metadata: Optional[Mapping[str, str]]) -> bytes:
        if final_metadata is None:
            return self._header
        final = build_header(self._entries, final_metadata)
        if len(final) != len(self._header):
            raise ValueError(
                f"{self.out_path}: the final header is {len(final)} bytes, the one written {len(self._header)}; "
                "metadata filled in at close must keep every value's length"
            )
        return final

    def _verified_digest(self, final_header: bytes) -> str:
        """The sha256 of the temp file's bytes as read back from disk; it must equal the hash of
        the bytes written (a printed hash is the hash of the file, never of our intentions).

        When ``final_header`` was written over the streamed header, the data read back is also
        hashed behind the streamed header (in the same read) and must give the streamed hash, and
        the header read back must be ``final_header``.
        """
        try:
            if final_header == self._header:
                on_disk = _hash_prefix(self.temp_path, self._total_size).hexdigest()
                data_check = on_disk
            else:
                on_disk, data_check, header = _hash_twice(self.temp_path, self._total_size, self._header)
                if header != final_header:
                    raise OutputError(f"{self.temp_path}: the header on disk is not the one written")
        except (OSError, EOFError) as error:
            raise OutputError(f"{self.temp_path}: cannot read the written file back ({error})") from error
        written = self._hasher.hexdigest()
        if data_check != written:
            raise OutputError(
                f"{self.temp_path}: the bytes on disk differ from the bytes written (sha256 {data_check} != {written}); "
                "another program changed the file, or the disk is failing"
            )
        return on_disk

    def _verify(self, metadata: Mapping[str, str]) -> None:
        """Check the temp file parses as safetensors with exactly the declared entries and ``metadata``."""
        from safetensors import safe_open

        size = self.temp_path.stat().st_size
        if size != self._total_size:
            raise OSError(f"{self.temp_path}: size {size} != expected {self._total_size}")
        names = {e.name: e for e in self._entries}
        with safe_open(os.fspath(self.temp_path), framework="pt") as f:
            keys = set(f.keys())
            if keys != set(names):
                raise OSError(f"{self.temp_path}: header keys differ from the entry list")
            for name, spec in names.items():
                sl = f.get_slice(name)
                if sl.get_dtype() != DTYPE_NAMES[spec.dtype] or tuple(sl.get_shape()) != spec.shape:
                    raise OSError(f"{self.temp_path}: entry {name!r} has a wrong dtype or shape")
            if (f.metadata() or {}) != dict(metadata):
                raise OSError(f"{self.temp_path}: metadata does not read back")

    def __enter__(self) -> StreamingCheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def __repr__(self) -> str:
        return f"StreamingCheckpointWriter({os.fspath(self.out_path)!r}, {self._index}/{len(self._entries)} written)"
