"""Pure torch tensor math for TGMD and relatives: no file I/O, no mergekit imports."""

from .aggregate import disjoint_mean, ordered_sum
from .consensus import disjoint_mask, elect_sign
from .geomedian import GeoMedianResult, GramAccumulator, weiszfeld, weiszfeld_gram
from .rng import keep_mask, keep_masks, stable_hash
from .sparsify import apply_drop, apply_trim, trim_threshold
from .tgmd import (
    MaskFn,
    RowReader,
    TGMDParams,
    merge_geometric_median,
    merge_task_vectors,
    rows_cols,
    tensor_reader,
    tgmd_merge,
    warn_bad_input,
)

__all__ = [
    "keep_mask",
    "keep_masks",
    "stable_hash",
    "apply_drop",
    "trim_threshold",
    "apply_trim",
    "elect_sign",
    "disjoint_mask",
    "disjoint_mean",
    "ordered_sum",
    "weiszfeld",
    "weiszfeld_gram",
    "GramAccumulator",
    "GeoMedianResult",
    "TGMDParams",
    "RowReader",
    "MaskFn",
    "rows_cols",
    "tensor_reader",
    "warn_bad_input",
    "merge_task_vectors",
    "merge_geometric_median",
    "tgmd_merge",
]
