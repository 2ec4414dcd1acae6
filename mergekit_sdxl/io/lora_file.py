"""A LoRA / LyCORIS file read lazily, bound to the base it is baked into, one row range at a time.

:class:`LoraFile` parses the header once (:func:`~mergekit_sdxl.sdxl.header.read_header`, then
:func:`~mergekit_sdxl.sdxl.lora_keys.parse_lora`) and reads a module's factor tensors with
``pread`` only when a key it changes is merged (a few recently used modules are kept: the rows
of one key are asked for chunk by chunk). :meth:`LoraFile.bind` checks the file against a base's
key shapes, header only, and gives a :class:`LoraBinding`: per SDXL key, the modules that change
it; :meth:`LoraBinding.rows` is rows ``r0:r1`` of the key in ``base + LoRA``, computed from the
base's rows and the factors (:mod:`mergekit_sdxl.kernels.lora_delta`), never a whole model.

Every problem is a :class:`~mergekit_sdxl.sdxl.header.CheckpointError` naming the LoRA file and
the tensor or module: a family other than SDXL's, a module that maps to no SDXL key, factors
that do not fit the base's key.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_sdxl.kernels.lora_delta import (
    LoraMathError,
    delta_rows,
    dora_column_sumsq,
    dora_columns,
    dora_rows,
    module_scale,
)
from mergekit_sdxl.sdxl.dtypes import torch_dtypes
from mergekit_sdxl.sdxl.families import MERGEABLE_FAMILIES, family_label
from mergekit_sdxl.sdxl.header import CheckpointError, SafetensorsHeader, read_header
from mergekit_sdxl.sdxl.lora_detect import LoraDetection, detect_lora
from mergekit_sdxl.sdxl.lora_keys import LoraLayout, LoraModule, delta_shape, normalised_module, parse_lora, rank_of
from mergekit_sdxl.sdxl.lora_peft import PeftMetadataError, peft_alpha, peft_configs

__all__ = ["LoraFile", "LoraBinding", "Contribution", "RowsOf", "COMPUTE_DTYPE"]

# The dtype a LoRA's change and base + change are computed and returned in: exact for fp16/bf16
# bases, and a task vector (base + change) - base keeps the change to float32 precision.
COMPUTE_DTYPE = torch.float32
_MAX_LISTED = 5
# Factors kept per LoRA file (float32): a key takes at most three
# modules of one LoRA (CLIP-G's q / k / v share in_proj_weight) and its row chunks ask for the same
# ones in turn. More would keep keys already merged: with a thousand LoRAs, N times that.
_CACHED_MODULES = 3
_PREPASS_ELEMENTS = 1 << 22  # rows per chunk of a DoRA column-norm pre-pass: about 16 MB

RowsOf = Callable[[int, int], torch.Tensor]
"""(r0, r1) -> rows of a base key viewed as [rows, cols]."""


def _rows_cols(shape: Sequence[int]) -> Tuple[int, int]:
    rows = int(shape[0]) if len(shape) else 1
    numel = 1
    for d in shape:
        numel *= int(d)
    return rows, (numel // rows if rows else 0)


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


@dataclass(frozen=True)
class Contribution:
    """One module's change to one SDXL key.

    ``part``: ``"weight"`` or ``"bias"``; ``row0:row1``: the rows of the key that are the module's
    (a third of CLIP-G's stacked ``in_proj``, else all); ``module_shape``: the module's weight
    shape (``[out, in, kh, kw]``, transposed back for ``transpose``).
    """

    module: LoraModule
    part: str
    row0: int
    row1: int
    module_shape: Tuple[int, ...]
    transpose: bool = False

    @property
    def rows(self) -> int:
        """Rows of the module's own weight (``[out, in * kernel]``)."""
        return self.module_shape[0]

    @property
    def cols(self) -> int:
        return _rows_cols(self.module_shape)[1]


class LoraFile:
    """One LoRA file: header facts, and factor tensors read on demand."""

    def __init__(self, path: str, header: Optional[SafetensorsHeader] = None) -> None:
        self.path = os.path.abspath(path)
        self.header = header if header is not None else read_header(path)
        self.layout: LoraLayout = parse_lora(self.header.tensors)
        self._detection: Optional[LoraDetection] = None
        self._peft: Optional[Dict[str, Dict[str, Any]]] = None
        self._cache: OrderedDict[str, Tuple[Dict[str, torch.Tensor], float]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes_read = 0

    @property
    def detection(self) -> LoraDetection:
        if self._detection is None:
            self._detection = detect_lora(self.header, self.layout)
        return self._detection

    def error(self, message: str, key: Optional[str] = None) -> CheckpointError:
        return CheckpointError(self.path, message, key=key)

    @property
    def peft_configs(self) -> Dict[str, Dict[str, Any]]:
        """The PEFT configs of diffusers' ``lora_adapter_metadata`` (empty when there is none)."""
        if self._peft is None:
            try:
                self._peft = peft_configs(self.header.metadata)
            except PeftMetadataError as error:
                raise self.error(f"metadata: {error}") from None
        return self._peft

    # ------------------------------------------------------------------ checks against a base

    def check_family(self) -> None:
        """Refuse a LoRA trained for another family than the mergeable SDXL ones."""
        det = self.detection
        if det.family in MERGEABLE_FAMILIES:
            return
        if det.family == "unknown":
            return  # nothing says otherwise: the key mapping and shapes decide
        raise self.error(
            f"a LoRA for {family_label(det.family)} (from {det.family_source}); only SDXL LoRAs can be merged with an SDXL base"
        )

    def check_layout(self) -> None:
        """Refuse unreadable modules and modules that change no SDXL key."""
        layout = self.layout
        if layout.problems:
            name, why = layout.problems[0]
            more = f" (and {len(layout.problems) - 1} more problems)" if len(layout.problems) > 1 else ""
            raise self.error(f"{why}{more}", key=name)
        if layout.unmapped:
            raise self.error(
                f"{len(layout.unmapped)} LoRA modules map to no SDXL key: {_listed(sorted(layout.unmapped))}",
                key=sorted(layout.unmapped)[0],
            )
        if not layout.modules:
            raise self.error("no LoRA modules in this file")

    def bind(self, base_shapes: Mapping[str, Tuple[int, ...]], base_name: str = "the base") -> LoraBinding:
        """The file's modules laid onto a base with these (canonical) key shapes; header only."""
        self.check_family()
        self.check_layout()
        _ = self.peft_configs  # unreadable metadata is refused before any work
        shapes = {name: info.shape for name, info in self.header.tensors.items()}
        by_key: Dict[str, List[Contribution]] = {}
        for module in self.layout.modules.values():
            for contribution in self._contributions(module, shapes, base_shapes, base_name):
                by_key.setdefault(self._key(module, contribution.part), []).append(contribution)
        for key, parts in by_key.items():
            spans = sorted((c.row0, c.row1, c.module.name) for c in parts)
            for (_a0, a1, a), (b0, _b1, b) in zip(spans, spans[1:], strict=False):
                if b0 < a1:
                    raise self.error(f"modules {a} and {b} both change the same rows of {key}", key=b)
        return LoraBinding(self, {k: tuple(v) for k, v in by_key.items()})

    @staticmethod
    def _key(module: LoraModule, part: str) -> str:
        key = module.target.bias if part == "bias" else module.target.weight
        assert key is not None
        return key

    def _contributions(
        self,
        module: LoraModule,
        shapes: Mapping[str, Tuple[int, ...]],
        base_shapes: Mapping[str, Tuple[int, ...]],
        base_name: str,
    ) -> List[Contribution]:
        target = module.target
        base_shape = base_shapes.get(target.weight)
        if base_shape is None:
            raise self.error(f"module {module.name} changes {target.weight}, which {base_name} lacks", key=module.name)
        rows, _ = _rows_cols(base_shape)
        if target.block is not None:
            if rows % 3:
                raise self.error(f"{target.weight} of {base_name} has {rows} rows: not a stacked q/k/v", key=module.name)
            rows //= 3
            row0, module_shape = target.block * rows, (rows,) + tuple(base_shape[1:])
        elif target.transpose:
            row0, module_shape = 0, tuple(reversed(base_shape))
        else:
            row0, module_shape = 0, tuple(base_shape)
        out: List[Contribution] = []
        parts = self._parts(module)
        if "weight" in parts:
            self._check_weight(module, shapes, module_shape, target.weight, base_name)
            out.append(Contribution(module, "weight", row0, row0 + rows, module_shape, target.transpose))
        if "bias" in parts:
            bias_key = target.bias
            if bias_key is None or bias_key not in base_shapes:
                raise self.error(f"module {module.name} changes a bias that {target.weight} of {base_name} does not have", key=module.name)
            component = "diff_b" if module.kind == "full" else "b_norm"
            n = 1
            for d in shapes[module.components[component]]:
                n *= int(d)
            if n != module_shape[0]:
                raise self.error(f"{component} has {n} values, {bias_key} of {base_name} {module_shape[0]} here", key=module.components[component])
            out.append(Contribution(module, "bias", row0, row0 + module_shape[0], (module_shape[0],)))
        return out

    @staticmethod
    def _parts(module: LoraModule) -> Tuple[str, ...]:
        c = module.components
        if module.kind == "full":
            return tuple(p for p, name in (("weight", "diff"), ("bias", "diff_b")) if name in c)
        if module.kind == "norm":
            return tuple(p for p, name in (("weight", "w_norm"), ("bias", "b_norm")) if name in c)
        return ("weight",)

    def _check_weight(
        self,
        module: LoraModule,
        shapes: Mapping[str, Tuple[int, ...]],
        module_shape: Tuple[int, ...],
        key: str,
        base_name: str,
    ) -> None:
        try:
            got = delta_shape(module, shapes)
        except ValueError as error:
            raise self.error(str(error), key=module.name) from None
        want = _rows_cols(module_shape)
        if got != want:
            raise self.error(
                f"module {module.name} changes {key} by a [{got[0]}, {got[1]}] weight, "
                f"but {base_name} has {list(module_shape)} ([{want[0]}, {want[1]}]) there",
                key=module.name,
            )
        dora = module.components.get("dora_scale")
        if dora is not None:
            n = 1
            for d in shapes[dora]:
                n *= int(d)
            channels = module_shape[1] if len(module_shape) > 1 else 1
            if n not in (module_shape[0], channels):
                raise self.error(f"dora_scale has {n} values; {key} has {module_shape[0]} rows and {channels} input channels", key=dora)

    # ------------------------------------------------------------------ reading factors

    def _read(self, name: str) -> torch.Tensor:
        info = self.header.tensors[name]
        dtype = torch_dtypes().get(info.dtype)
        if dtype is None:
            raise self.error(f"unsupported dtype {info.dtype}", key=name)
        start, stop = self.header.absolute_offsets(name)
        buffer = bytearray(stop - start)
        view = memoryview(buffer)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as error:
            raise self.error(f"cannot open: {error.strerror or error}") from error
        try:
            done = 0
            while done < len(buffer):
                got = os.preadv(fd, [view[done:]], start + done)
                if got <= 0:
                    raise self.error("file ends inside this tensor (truncated?)", key=name)
                done += got
        finally:
            os.close(fd)
        self.bytes_read += len(buffer)
        if not buffer:
            return torch.empty(tuple(info.shape), dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(tuple(info.shape))

    def factors(self, module: LoraModule) -> Tuple[Dict[str, torch.Tensor], float]:
        """The module's factor tensors in :data:`COMPUTE_DTYPE` and its scale (alpha / rank)."""
        with self._lock:
            hit = self._cache.get(module.name)
            if hit is not None:
                self._cache.move_to_end(module.name)
                return hit
        tensors: Dict[str, torch.Tensor] = {}
        alpha: Optional[float] = None
        for component, name in module.components.items():
            if component == "lokr_t1":
                continue  # LyCORIS never uses it
            value = self._read(name).to(COMPUTE_DTYPE)
            if not bool(torch.isfinite(value).all()):
                raise self.error("non-finite values", key=name)
            if component == "alpha":
                if value.numel() != 1:
                    raise self.error(f"alpha has {value.numel()} values, expected one", key=name)
                alpha = float(value.reshape(()))
            else:
                tensors[component] = value
        shapes = {name: info.shape for name, info in self.header.tensors.items()}
        rslora = False
        if alpha is None and module.components.get("down", "").endswith(".lora_A.weight"):
            found = peft_alpha(self.peft_configs, normalised_module(module.name))  # diffusers / PEFT's own alpha
            if found is not None:
                alpha, rslora = found.alpha, found.rslora
        result = (tensors, module_scale(module.kind, alpha, rank_of(module, shapes), rslora=rslora))
        with self._lock:
            self._cache[module.name] = result
            while len(self._cache) > _CACHED_MODULES:
                self._cache.popitem(last=False)
        return result


class LoraBinding:
    """A LoRA file laid onto a base: which keys it changes, and their rows in ``base + LoRA``."""

    def __init__(self, lora: LoraFile, by_key: Mapping[str, Tuple[Contribution, ...]]) -> None:
        self.lora = lora
        self.by_key: Dict[str, Tuple[Contribution, ...]] = dict(by_key)
        self._column_norms: Dict[Tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    def touches(self, key: str) -> bool:
        return key in self.by_key

    @property
    def keys(self) -> Tuple[str, ...]:
        return tuple(self.by_key)

    def rows(self, key: str, r0: int, r1: int, base_rows: RowsOf, shape: Sequence[int]) -> torch.Tensor:
        """Rows ``r0:r1`` of ``key`` (shape ``shape``) in base + LoRA, as ``[r1 - r0, cols]`` in
        :data:`COMPUTE_DTYPE`; ``base_rows`` reads the base's rows of that key."""
        out = base_rows(r0, r1).to(COMPUTE_DTYPE).clone()
        for c in self.by_key.get(key, ()):
            lo, hi = max(r0, c.row0), min(r1, c.row1)
            if lo >= hi:
                continue
            try:
                if c.part == "bias":
                    out[lo - r0 : hi - r0] += self._bias_rows(c, lo - c.row0, hi - c.row0)
                elif c.transpose:
                    out[lo - r0 : hi - r0] = self._transposed_rows(c, base_rows, shape)[lo - c.row0 : hi - c.row0]
                else:
                    out[lo - r0 : hi - r0] = self._weight_rows(c, out[lo - r0 : hi - r0], lo - c.row0, hi - c.row0, base_rows)
            except LoraMathError as error:
                raise self.lora.error(f"module {c.module.name}: {error}", key=c.module.name) from None
        return out

    def _bias_rows(self, c: Contribution, m0: int, m1: int) -> torch.Tensor:
        tensors, _ = self.lora.factors(c.module)
        values = tensors["diff_b" if c.module.kind == "full" else "b_norm"]
        return values.reshape(-1, 1)[m0:m1]

    def _weight_rows(self, c: Contribution, base: torch.Tensor, m0: int, m1: int, base_rows: RowsOf) -> torch.Tensor:
        """The module's rows m0:m1 after the change (``base``: the same rows before it)."""
        tensors, scale = self.lora.factors(c.module)
        merged = base + delta_rows(c.module.kind, tensors, scale, m0, m1, c.cols)
        dora = tensors.get("dora_scale")
        if dora is None:
            return merged
        if self._row_magnitudes(c, dora):
            return dora_rows(merged, dora, m0, m1)
        return dora_columns(merged, dora, self._column_sumsq(c, tensors, scale, base_rows))

    @staticmethod
    def _row_magnitudes(c: Contribution, dora: torch.Tensor) -> bool:
        """One DoRA magnitude per output row (LyCORIS ``wd_on_out``, PEFT), else per input channel."""
        channels = c.module_shape[1] if len(c.module_shape) > 1 else 1
        if dora.numel() != channels:
            return True
        if dora.numel() != c.rows:
            return False
        return not (dora.ndim >= 2 and dora.shape[0] == 1)  # [1, in, ...]: LyCORIS's per-channel layout

    def _column_sumsq(self, c: Contribution, tensors: Mapping[str, torch.Tensor], scale: float, base_rows: RowsOf) -> torch.Tensor:
        """Per input channel, the sum of squares of the module's whole changed weight (a pre-pass
        over its rows, kept while this key is merged)."""
        cache_key = (self._key_of(c), c.module.name)
        with self._lock:
            hit = self._column_norms.get(cache_key)
        if hit is not None:
            return hit
        channels = c.module_shape[1]
        step = max(1, _PREPASS_ELEMENTS // max(1, c.cols))
        total = torch.zeros(channels, dtype=COMPUTE_DTYPE)
        for m0 in range(0, c.rows, step):
            m1 = min(c.rows, m0 + step)
            merged = base_rows(c.row0 + m0, c.row0 + m1).to(COMPUTE_DTYPE) + delta_rows(
                c.module.kind, tensors, scale, m0, m1, c.cols
            )
            total += dora_column_sumsq(merged, channels)
        with self._lock:
            self._column_norms = {k: v for k, v in self._column_norms.items() if k[0] == cache_key[0]}
            self._column_norms[cache_key] = total
        return total

    def _key_of(self, c: Contribution) -> str:
        return LoraFile._key(c.module, c.part)

    def _transposed_rows(self, c: Contribution, base_rows: RowsOf, shape: Sequence[int]) -> torch.Tensor:
        """Every row of a key stored transposed (CLIP-G ``text_projection``), after the change."""
        rows, _ = _rows_cols(shape)
        module_weight = base_rows(0, rows).to(COMPUTE_DTYPE).reshape(tuple(shape)).t().reshape(c.module_shape[0], -1)
        changed = self._weight_rows(c, module_weight, 0, c.module_shape[0], lambda a, b: module_weight[a:b])
        return changed.reshape(c.module_shape[0], -1).t().reshape(rows, -1)
