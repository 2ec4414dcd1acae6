"""A LoRA file on an SDXL checkpoint as a mergekit model: ``{model: base, lora: style}``.

mergekit normally merges a ``ModelReference``'s LoRA into a whole model on disk with PEFT
(``ModelReference.merged``). Here such a reference is a *virtual* model instead: its tensor for a
key is the base checkpoint's tensor plus the LoRA's change for that key, computed from the LoRA's
factors for the rows asked for only (:class:`~mergekit_sdxl.io.lora_file.LoraBinding`), so a
thousand LoRAs never exist as a thousand models in memory.

* :class:`LoraModelIndex`: the base's index (same canonical keys and shapes), with the keys the
  LoRA changes stored as float32 (the change is computed in float32 and kept there: rounding
  ``base + change`` to fp16 would lose most of a small LoRA's change).
* :class:`LoraModelLoader`: ``get_tensor`` / ``get_rows`` give base + change; keys the LoRA does
  not change give the base's own rows, read once for all LoRAs on that base (the last rows read
  are shared).
* :func:`abstain_untouched`: for this plugin's task-vector methods (tgmd, ties_soup, dgmla), a
  LoRA model on a key it does not change is a zero task vector that abstains from the vote
  (its reader returns None; nothing is read or computed), and a key no input changes is the base.

The LoRA strength (kohya's multiplier) is a method parameter, not part of the model: with
``task_arithmetic`` it is the entry's ``weight`` (base + weight * change).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Tuple

import torch

from mergekit_sdxl.host.checkpoint import SDXLCheckpointIndex, SDXLCheckpointLoader, checkpoint_config, checkpoint_index
from mergekit_sdxl.host.mergekit_api import LazyTensorLoader, LoaderCache, ModelReference
from mergekit_sdxl.io.lora_file import LoraBinding, LoraFile
from mergekit_sdxl.sdxl.keys import POSITION_IDS_KEY, position_ids

__all__ = [
    "LORA_DTYPE_NAME",
    "LoraModelIndex",
    "LoraModelLoader",
    "is_lora_reference",
    "lora_file",
    "lora_model_index",
    "lora_model_config",
    "lora_model_loader",
    "abstain_untouched",
]

LORA_DTYPE_NAME = "F32"  # safetensors name of COMPUTE_DTYPE: how the memory plan counts changed keys


def is_lora_reference(ref: Any) -> bool:
    """A ``ModelReference`` of an SDXL checkpoint file with a LoRA ``.safetensors`` file."""
    lora = getattr(ref, "lora", None)
    if lora is None:
        return False
    return _is_file(ref.model.path) and _is_file(lora.path)


def _is_file(path: str) -> bool:
    return path.lower().endswith(".safetensors") and os.path.isfile(path)


def _file_key(path: str) -> Tuple[str, int, int]:
    stat = os.stat(path)
    return (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


_LOCK = threading.Lock()
_FILES: Dict[Tuple[str, int, int], LoraFile] = {}
_INDEXES: Dict[Tuple[Tuple[str, int, int], Tuple[str, int, int]], LoraModelIndex] = {}
_MAX_CACHED = 4096


def lora_file(path: str) -> LoraFile:
    """The parsed LoRA file (once per path, size and mtime)."""
    key = _file_key(path)
    with _LOCK:
        found = _FILES.get(key)
    if found is None:
        found = LoraFile(path)
        with _LOCK:
            if len(_FILES) > _MAX_CACHED:
                _FILES.clear()
            found = _FILES.setdefault(key, found)
    return found


@dataclass
class LoraModelIndex(SDXLCheckpointIndex):
    """The index of base + LoRA: the base's keys and shapes; ``binding`` says what changes."""

    lora_path: str = ""
    binding: Optional[LoraBinding] = field(default=None, repr=False, compare=False)
    touched: FrozenSet[str] = frozenset()


def lora_model_index(ref: Any) -> LoraModelIndex:
    """The index of ``ref`` (base checkpoint + LoRA), checked against the base (once per pair of
    files). A LoRA for another family, a module mapping to no SDXL key or factors that do not
    fit the base are errors naming the LoRA file."""
    base_path, lora_path = ref.model.path, ref.lora.path
    key = (_file_key(base_path), _file_key(lora_path))
    with _LOCK:
        found = _INDEXES.get(key)
    if found is not None:
        return found
    base = checkpoint_index(base_path)
    lora = lora_file(lora_path)
    binding = lora.bind(base.shapes, base_name=os.path.basename(base_path))
    dtypes = _ChangedDtypes(base.dtypes, frozenset(binding.keys))
    index = LoraModelIndex(
        base_path=base.base_path,
        is_safetensors=True,
        tensor_paths=base.tensor_paths,
        shards=base.shards,
        file_path=base.file_path,
        stored_names=base.stored_names,
        shapes=base.shapes,
        stored_shapes=base.stored_shapes,
        dtypes=dtypes,
        flags=base.flags,
        dropped=base.dropped,
        byte_ranges={},  # nothing of its own to read ahead or count: the base loader reads
        lora_path=lora.path,
        binding=binding,
        touched=frozenset(binding.keys),
    )
    with _LOCK:
        if len(_INDEXES) > _MAX_CACHED:
            _INDEXES.clear()
        return _INDEXES.setdefault(key, index)


class _ChangedDtypes(Mapping[str, str]):
    """The base's dtypes with the keys a LoRA changes as float32: a view, not a 2515-entry copy
    per LoRA (a thousand LoRAs each changing their own set of keys would hold a thousand)."""

    __slots__ = ("_base", "_changed")

    def __init__(self, base: Mapping[str, str], changed: FrozenSet[str]) -> None:
        self._base = base
        self._changed = changed

    def __getitem__(self, key: str) -> str:
        if key in self._changed:
            return LORA_DTYPE_NAME
        return self._base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def lora_model_config(ref: Any) -> Any:
    """The config of base + LoRA: the base checkpoint's (the LoRA is checked first)."""
    lora_model_index(ref)
    return checkpoint_config(ref.model.path)


class _LastRows:
    """The last rows read of one base file, shared by every LoRA model on that base: the N
    models of one key ask for the same rows one after the other."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()  # one entry per thread (merge lanes run keys in threads)

    def get(self, what: Tuple[str, int, int], read: Callable[[], torch.Tensor]) -> torch.Tensor:
        last = getattr(self._local, "last", None)
        if last is not None and last[0] == what:
            return last[1]
        value = read()
        self._local.last = (what, value)
        return value


_SHARED_ROWS: Dict[str, _LastRows] = {}


def _shared_rows(path: str) -> _LastRows:
    with _LOCK:
        return _SHARED_ROWS.setdefault(path, _LastRows())


class LoraModelLoader(LazyTensorLoader):
    """Tensors of base + LoRA, whole or as row ranges (rows of the key viewed as [rows, cols])."""

    index: LoraModelIndex

    def __init__(self, index: LoraModelIndex, base: SDXLCheckpointLoader) -> None:
        super().__init__(index, lazy_unpickle=False)
        self.base = base
        assert index.binding is not None
        self.binding = index.binding
        self._rows = _shared_rows(index.file_path)

    def touches(self, key: str) -> bool:
        """Whether the LoRA changes ``key``."""
        return key in self.index.touched

    def _base_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._rows.get((key, start, stop), lambda: self.base.get_rows(key, start, stop))

    def _base_tensor(self, key: str) -> torch.Tensor:
        tensor = self.base.get_tensor(key)
        if tensor is None:
            raise KeyError(key)
        return tensor

    def _resolve(self, key: str, aliases: Optional[List[str]]) -> Optional[str]:
        if key in self.index.tensor_paths:
            return key
        return next((a for a in aliases or () if a in self.index.tensor_paths), None)

    def get_tensor(
        self,
        key: str,
        device: str = "cpu",
        aliases: Optional[List[str]] = None,
        raise_on_missing: bool = True,
    ) -> Optional[torch.Tensor]:
        found = self._resolve(key, aliases)
        if found is None:
            if raise_on_missing:
                raise KeyError(key)
            return None
        if found == POSITION_IDS_KEY:
            return position_ids().to(device)
        shape = tuple(self.index.shapes[found])
        if not self.touches(found):
            return self._rows.get((found, -1, -1), lambda: self._base_tensor(found)).to(device)
        rows = shape[0] if shape else 1
        return self.get_rows(found, 0, rows).reshape(shape).to(device)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of base + LoRA; the base's own rows (stored dtype) where the LoRA
        changes nothing, else float32."""
        if not self.touches(key):
            return self._base_rows(key, start, stop)
        shape = tuple(self.index.shapes[key])
        return self.binding.rows(key, start, stop, lambda a, b: self._base_rows(key, a, b), shape)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the base loader owns the only descriptor


def lora_model_loader(ref: Any) -> LoraModelLoader:
    """The loader of base + LoRA; base reads go through the base checkpoint's own loader."""
    index = lora_model_index(ref)
    base = LoaderCache().get(ModelReference(model=ref.model))
    if not isinstance(base, SDXLCheckpointLoader):
        raise TypeError(f"{ref.model}: expected an SDXL checkpoint loader, got {type(base).__name__}")
    return LoraModelLoader(index, base)


def _abstain(_start: int, _stop: int) -> Optional[torch.Tensor]:
    return None


def abstain_untouched(
    readers: Mapping[Any, Optional[Callable[[int, int], Optional[torch.Tensor]]]], base: Any, name: str
) -> Dict[Any, Optional[Callable[[int, int], Optional[torch.Tensor]]]]:
    """Readers of a key for a task-vector method (tgmd, ties_soup, dgmla).

    A LoRA model that does not change ``name`` has a zero task vector, exactly as if the LoRA had
    been baked into a checkpoint first: its reader returns None (the kernels' absent rows: zero,
    no vote in the sign election, a point at the origin of the median), and nothing of it is read
    or computed. When no input but the base changes the key, those models are left out and the
    key is the base itself (what N zero task vectors give, without the N x N work).
    """
    untouched = set()
    for model, reader in readers.items():
        if reader is None or model == base:
            continue
        loader = LoaderCache().loaders.get(model)
        if isinstance(loader, LoraModelLoader) and not loader.touches(name):
            untouched.add(model)
    if not untouched:
        return dict(readers)
    others = [m for m, r in readers.items() if r is not None and m != base and m not in untouched]
    fill = _abstain if others else None
    return {m: (fill if m in untouched else r) for m, r in readers.items()}
