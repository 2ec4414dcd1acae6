"""SDXL single-file checkpoints as mergekit models: config, tensor index and lazy loader.

A ``.safetensors`` path in a mergekit config is read as one SDXL checkpoint. Tensor
bytes are read with ``pread`` from one file descriptor kept open for the whole
merge (not through mmap: mapped pages would count in the process' resident
memory for every input at once), whole or as contiguous row ranges. The
index exposes canonical (manifest) key names only, so key hygiene happens once,
at the loader: ``text_projection.weight`` variants are transposed to the sgm
``text_projection``, 2-D VAE attention weights get their 1x1 conv shape back,
``position_ids`` is always int64 ``arange(77)``, and keys outside the manifest
(EMA, embedded LoRA, schedule buffers) are dropped with one warning per file.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch
from transformers import PretrainedConfig

from mergekit_sdxl.host.mergekit_api import LazyTensorLoader, ShardedTensorIndex, ShardInfo
from mergekit_sdxl.io.writer import TORCH_DTYPES
from mergekit_sdxl.sdxl import keys as sdxl_keys
from mergekit_sdxl.sdxl.families import MERGEABLE_FAMILIES, family_label
from mergekit_sdxl.sdxl.header import CheckpointError, read_header
from mergekit_sdxl.sdxl.manifest import POSITION_IDS_DTYPE, POSITION_IDS_KEY, POSITION_IDS_SHAPE

LOG = logging.getLogger(__name__)

ARCHITECTURE_NAME = "SDXLCheckpoint"
MODEL_TYPE = "sdxl_checkpoint"


def is_checkpoint_file(path: str) -> bool:
    """True for an existing single-file ``.safetensors`` checkpoint path."""
    return path.lower().endswith(".safetensors") and os.path.isfile(path)


class SDXLCheckpointConfig(PretrainedConfig):
    """Stand-in for ``config.json``: mergekit asks every input for one."""

    model_type = MODEL_TYPE

    def __init__(self, checkpoint_path: str = "", v_pred: bool = False, ztsnr: bool = False, **kwargs):
        kwargs.setdefault("architectures", [ARCHITECTURE_NAME])
        super().__init__(**kwargs)
        self.checkpoint_path = checkpoint_path
        self.v_pred = v_pred
        self.ztsnr = ztsnr


@dataclass
class SDXLCheckpointIndex(ShardedTensorIndex):
    """Index of one checkpoint file keyed by canonical SDXL names."""

    file_path: str = ""
    stored_names: Dict[str, str] = field(default_factory=dict)
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    stored_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    dtypes: Mapping[str, str] = field(default_factory=dict)
    flags: FrozenSet[str] = frozenset()
    dropped: Tuple[str, ...] = ()
    # canonical name -> absolute (start, end) byte range of the stored tensor
    byte_ranges: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str) -> SDXLCheckpointIndex:
        header = read_header(path)
        stored_names: Dict[str, str] = {}
        shapes: Dict[str, Tuple[int, ...]] = {}
        stored_shapes: Dict[str, Tuple[int, ...]] = {}
        byte_ranges: Dict[str, Tuple[int, int]] = {}
        dtypes: Dict[str, str] = {}
        flags = set()
        dropped: List[str] = []
        for stored, info in header.tensors.items():
            canonical = sdxl_keys.canonical_name(stored)
            if canonical is None:
                kind = sdxl_keys.classify_extra_key(stored)
                if kind.startswith("flag:"):
                    flags.add(kind[len("flag:"):])
                else:
                    dropped.append(stored)
                continue
            if canonical in stored_names and stored_names[canonical] == canonical:
                continue  # the sgm name wins over a variant spelling
            stored_names[canonical] = stored
            shapes[canonical] = sdxl_keys.canonical_shape(canonical, stored, tuple(info.shape))
            stored_shapes[canonical] = tuple(info.shape)
            byte_ranges[canonical] = header.absolute_offsets(stored)
            dtypes[canonical] = info.dtype
        if dropped:
            LOG.warning(
                "%s: ignoring %d keys outside the SDXL manifest (e.g. %s)",
                path,
                len(dropped),
                ", ".join(sorted(dropped)[:3]),
            )
        # position_ids is a constant buffer: always present, whatever the file holds.
        shapes[POSITION_IDS_KEY] = POSITION_IDS_SHAPE
        dtypes[POSITION_IDS_KEY] = POSITION_IDS_DTYPE
        shard = os.path.basename(path)
        tensor_paths = {name: shard for name in list(stored_names) + [POSITION_IDS_KEY]}
        return cls(
            base_path=os.path.dirname(os.path.abspath(path)),
            is_safetensors=True,
            tensor_paths=tensor_paths,
            shards=[ShardInfo(shard, list(tensor_paths))],
            file_path=os.path.abspath(path),
            stored_names=_shared(stored_names),
            shapes=_shared(shapes),
            stored_shapes=_shared(stored_shapes),
            byte_ranges=_shared(byte_ranges),
            dtypes=_shared(dtypes),
            flags=frozenset(flags),
            dropped=tuple(sorted(dropped)),
        )


_SHARED: Dict[tuple, dict] = {}


def _shared(table: dict) -> dict:
    """One dict object for equal tables: files of one layout have the same names, shapes and
    offsets, and a merge of 117 inputs would otherwise hold 117 copies (1.3 MB each)."""
    key = tuple(table.items())
    if len(_SHARED) > 64:
        _SHARED.clear()
    return _SHARED.setdefault(key, table)


class SDXLCheckpointLoader(LazyTensorLoader):
    """Lazy loader over one checkpoint file; reads whole tensors or row ranges."""

    index: SDXLCheckpointIndex

    def __init__(self, index: SDXLCheckpointIndex):
        super().__init__(index, lazy_unpickle=False)
        self._fd: Optional[int] = None
        self.bytes_read = 0

    def _read(self, key: str, start: int, stop: int) -> bytearray:
        if self._fd is None:
            try:
                self._fd = os.open(self.index.file_path, os.O_RDONLY)
            except OSError as error:
                raise CheckpointError(self.index.file_path, f"cannot open: {error}") from error
        length = stop - start
        buffer = bytearray(length)
        view = memoryview(buffer)
        done = 0
        while done < length:
            got = os.preadv(self._fd, [view[done:]], start + done)
            if got <= 0:
                raise CheckpointError(self.index.file_path, "file ends inside this tensor (truncated?)", key=key)
            done += got
        self.bytes_read += length
        return buffer

    def advise(self, key: str, row_start: int = 0, row_stop: Optional[int] = None) -> None:
        """Ask the OS to start reading rows [row_start, row_stop) of ``key`` now (a hint, no
        memory of ours: the page cache fills while the current key is computed)."""
        if key not in self.index.byte_ranges or not hasattr(os, "posix_fadvise"):
            return
        begin, end = self.index.byte_ranges[key]
        shape = self.index.stored_shapes.get(key, ())
        rows = shape[0] if shape else 1
        row_bytes = (end - begin) // rows if rows else 0
        stop = rows if row_stop is None else min(rows, row_stop)
        if stop <= row_start or row_bytes == 0:
            return
        try:
            with self.lock:
                if self._fd is None:
                    self._fd = os.open(self.index.file_path, os.O_RDONLY)
                fd = self._fd
            os.posix_fadvise(fd, begin + row_start * row_bytes, (stop - row_start) * row_bytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # only a hint: the read itself reports real errors
            pass

    def _stored_rows(self, key: str, row_start: int, row_stop: int) -> torch.Tensor:
        """Rows of the tensor as stored (row-major, so a row range is one byte range)."""
        shape = self.index.stored_shapes[key]
        dtype = TORCH_DTYPES.get(self.index.dtypes[key])
        if dtype is None:
            raise CheckpointError(self.index.file_path, f"unsupported dtype {self.index.dtypes[key]}", key=key)
        rows = shape[0] if shape else 1
        begin, end = self.index.byte_ranges[key]
        row_bytes = (end - begin) // rows if rows else 0
        data = self._read(key, begin + row_start * row_bytes, begin + row_stop * row_bytes)
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        if row_start == 0 and row_stop == rows:
            return flat.reshape(shape)
        return flat.reshape((row_stop - row_start,) + tuple(shape[1:]))

    def get_tensor(
        self,
        key: str,
        device: str = "cpu",
        aliases: Optional[List[str]] = None,
        raise_on_missing: bool = True,
    ) -> Optional[torch.Tensor]:
        if key not in self.index.tensor_paths:
            for alias in aliases or ():
                if alias in self.index.tensor_paths:
                    key = alias
                    break
            else:
                if raise_on_missing:
                    raise KeyError(key)
                return None
        if key == POSITION_IDS_KEY:
            return sdxl_keys.position_ids().to(device)
        shape = self.index.stored_shapes[key]
        with self.lock:
            tensor = self._stored_rows(key, 0, shape[0] if shape else 1)
        stored = self.index.stored_names[key]
        if stored != key or tuple(tensor.shape) != tuple(self.index.shapes[key]):
            tensor = sdxl_keys.canonicalize_tensor(key, stored, tensor)
        return tensor.to(device)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor viewed as [rows, cols], in its stored dtype."""
        shape = self.index.shapes[key]
        rows = shape[0] if shape else 1
        cols = 1
        for dim in shape[1:]:
            cols *= dim
        stored = self.index.stored_names.get(key)
        if stored != key or not shape or self.index.stored_shapes[key] != shape:
            # Variants need the whole tensor to be normalised; they are small.
            whole = self.get_tensor(key)
            assert whole is not None  # raise_on_missing: a missing key raises KeyError
            return whole.reshape(rows, cols)[start:stop]
        with self.lock:
            part = self._stored_rows(key, start, stop)
        return part.reshape(stop - start, cols)

    def flush(self) -> None:
        # Keep the descriptor: mergekit flushes between shards, a checkpoint is one file.
        pass

    def close(self) -> None:
        with self.lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


_INDEX_CACHE: Dict[Tuple[str, int, int], SDXLCheckpointIndex] = {}
_INDEX_LOCK = threading.Lock()


def checkpoint_index(path: str) -> SDXLCheckpointIndex:
    """Parse (once per path, size and mtime) the index of a checkpoint file."""
    key = _file_key(path)
    with _INDEX_LOCK:
        if key not in _INDEX_CACHE:
            _INDEX_CACHE[key] = SDXLCheckpointIndex.from_checkpoint(path)
        return _INDEX_CACHE[key]


_CONFIG_CACHE: Dict[Tuple[str, int, int], SDXLCheckpointConfig] = {}


def _file_key(path: str) -> Tuple[str, int, int]:
    stat = os.stat(path)
    return (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def checkpoint_config(path: str) -> SDXLCheckpointConfig:
    """Config for an SDXL checkpoint file (parsed once per path, size, mtime)."""
    key = _file_key(path)
    with _INDEX_LOCK:
        if key not in _CONFIG_CACHE:
            _CONFIG_CACHE[key] = _read_checkpoint_config(path)
        # mergekit sets attributes on configs it is given (torch_dtype): hand out copies.
        return copy.deepcopy(_CONFIG_CACHE[key])


def _read_checkpoint_config(path: str) -> SDXLCheckpointConfig:
    """Refuses files of other families: mergekit asks every input for a config first."""
    from mergekit_sdxl.sdxl.detect import detect

    header = read_header(path)
    detection = detect(header)
    if detection.family not in MERGEABLE_FAMILIES:
        raise CheckpointError(
            path,
            f"not an SDXL base-family checkpoint (detected: {family_label(detection.family)}); "
            "only SDXL 1.0-family files can be merged",
        )
    return SDXLCheckpointConfig(checkpoint_path=os.path.abspath(path), v_pred=detection.v_pred, ztsnr=detection.ztsnr)
