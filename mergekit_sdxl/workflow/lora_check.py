"""LoRA inputs checked before a merge, from headers only: each LoRA file against the checkpoint it
is applied to (family, key mapping, factor shapes), every problem listed in one
:class:`~mergekit_sdxl.workflow.preflight.PreflightError` naming the files.

Nothing here reads a tensor or imports mergekit: the same checks the merge's loader makes
(:meth:`~mergekit_sdxl.io.lora_file.LoraFile.bind`), made before any work starts.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_sdxl.io.lora_file import LoraFile
from mergekit_sdxl.sdxl.families import family_label
from mergekit_sdxl.sdxl.header import CheckpointError, read_header
from mergekit_sdxl.sdxl.keys import canonical_shapes
from mergekit_sdxl.sdxl.lora_detect import LoraDetection
from mergekit_sdxl.workflow.preflight import FileReport, PreflightError

__all__ = ["check_lora", "check_lora_inputs", "lora_exclusion_reason"]

Shapes = Dict[str, Tuple[int, ...]]


def _base_shapes(path: str, cache: Dict[str, Shapes]) -> Shapes:
    key = os.path.realpath(path)
    if key not in cache:
        cache[key] = canonical_shapes(read_header(path).tensors)
    return cache[key]


def check_lora(lora_path: str, base_shapes: Shapes, base_name: str) -> LoraDetection:
    """The LoRA file's detection, once it is known to fit a base with these key shapes; a
    :class:`~mergekit_sdxl.sdxl.header.CheckpointError` naming the file otherwise."""
    if not os.path.isfile(lora_path):
        raise CheckpointError(lora_path, "LoRA file not found")
    lora = LoraFile(lora_path)
    lora.bind(base_shapes, base_name=base_name)
    return lora.detection


def check_lora_inputs(pairs: Sequence[Tuple[str, str]]) -> List[LoraDetection]:
    """Check every ``(checkpoint path, LoRA path)`` pair; raise :class:`PreflightError` listing
    every problem (an SD 1.x LoRA on an SDXL base, a module that maps to no SDXL key, factors
    that do not fit), else return each LoRA's detection in order."""
    shapes: Dict[str, Shapes] = {}
    problems: List[str] = []
    found: List[LoraDetection] = []
    for model, lora in pairs:
        try:
            found.append(check_lora(lora, _base_shapes(model, shapes), os.path.basename(model)))
        except CheckpointError as error:
            problems.append(str(error))
    if problems:
        raise PreflightError(problems)
    return found


def lora_exclusion_reason(rep: FileReport) -> Optional[str]:
    """Why ``recipe DIR`` (a folder of checkpoints) leaves out a LoRA file, None for a non-LoRA:
    a LoRA is no checkpoint to merge, ``recipe --loras DIR`` bakes it into the base."""
    lora = rep.lora
    if lora is None:
        return None
    return f"a LoRA file ({lora.network}, for {family_label(lora.family)}), not a checkpoint: bake LoRAs in with recipe --loras DIR"
