"""No write ever lands on an input: compare every path a command will write with every input.

Two paths clash when they resolve to the same real path or name the same (device, inode):
``a.safetensors``, ``./sub/../a.safetensors``, a symlink to it and a hard link all clash with
``a.safetensors``. The checks run before any work, and name both files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from mergekit_sdxl.errors import OutputError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "OwnOutputs",
    "check_config_target",
    "check_distinct",
    "check_not_foreign",
    "check_no_symlinks",
    "check_output_target",
    "check_writes_do_not_clash",
    "merge_output_paths",
]

# Suffixes of checkpoint files: a config or recipe is never written under one of them.
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


def merge_output_paths(out_path: PathLike) -> List[Path]:
    """Every path a merge into ``out_path`` writes: the output, its temp file and journal,
    the lock file, the provenance sidecar and the model card."""
    from mergekit_sdxl.io.output_lock import lock_path_for
    from mergekit_sdxl.io.provenance import sidecar_paths
    from mergekit_sdxl.io.writer import journal_path_for, temp_path_for

    out = Path(out_path)
    partial = temp_path_for(out)
    return [out, partial, journal_path_for(partial), lock_path_for(out), *sidecar_paths(out)]


def _identity(path: Path) -> Tuple[str, Optional[Tuple[int, int]]]:
    real = os.path.realpath(path)
    try:
        st = os.stat(path)
        inode: Optional[Tuple[int, int]] = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return real, inode


def check_writes_do_not_clash(writes: Sequence[PathLike], inputs: Iterable[Tuple[PathLike, str]]) -> None:
    """Raise :class:`OutputError` if any path in ``writes`` is one of ``inputs``.

    ``inputs`` are ``(path, what)`` pairs, ``what`` saying what the file is to the command
    (``"the base model"``, ``"input models[2]"``, ``"a file under the scanned folder"``).
    """
    by_real: Dict[str, Tuple[str, str]] = {}
    by_inode: Dict[Tuple[int, int], Tuple[str, str]] = {}
    for path, what in inputs:
        real, inode = _identity(Path(path))
        by_real.setdefault(real, (os.fspath(path), what))
        if inode is not None:
            by_inode.setdefault(inode, (os.fspath(path), what))
    for write in writes:
        real, inode = _identity(Path(write))
        hit = by_real.get(real) or (by_inode.get(inode) if inode is not None else None)
        if hit is not None:
            raise OutputError(
                f"{os.fspath(write)}: this command would write over {hit[1]} {hit[0]}; choose another output path"
            )


def check_output_target(out_path: PathLike, *, suffix: Union[str, Tuple[str, ...]]) -> None:
    """The output must be a plain file name ending in ``suffix`` (one of them): not a directory,
    not a symlink, and its folder, where it exists, must be a folder."""
    out = Path(out_path)
    suffixes = (suffix,) if isinstance(suffix, str) else suffix
    if out.name in ("", ".", "..") or os.fspath(out_path).endswith(os.sep):
        raise OutputError(f"{os.fspath(out_path)}: not a file name")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name ending in {suffixes[0]}")
    if not out.name.lower().endswith(suffixes):
        raise OutputError(f"{out}: the output must be a {' or '.join(suffixes)} file")
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; refusing to replace it (give the real path)")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{parent}: not a directory")


def check_no_symlinks(paths: Iterable[PathLike]) -> None:
    """Refuse to start when a name this command will write is a symlink (checked up front, so
    that a merge never fails at its very end for it)."""
    for path in paths:
        if Path(path).is_symlink():
            raise OutputError(f"{os.fspath(path)}: is a symbolic link; remove it (this command writes a file of that name)")


def check_distinct(paths: Sequence[PathLike]) -> None:
    """Two outputs of one command under one name would overwrite each other."""
    seen: Dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise OutputError(f"{os.fspath(path)}: this command already writes {seen[real]} there; choose another name")
        seen[real] = os.fspath(path)


def check_config_target(path: PathLike) -> None:
    """A config/recipe output: a file name (not a folder, not a symlink, not a checkpoint name)."""
    target = Path(path)
    if os.fspath(path).endswith(os.sep) or target.name in ("", ".", ".."):
        raise OutputError(f"{os.fspath(path)}: not a file name")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory; give a file name such as {target / 'recipe.yaml'}")
    if target.is_symlink():
        raise OutputError(f"{target}: is a symbolic link; refusing to replace it (give the real path)")
    if target.name.lower().endswith(_CHECKPOINT_SUFFIXES):
        raise OutputError(f"{target}: a config is YAML text; refusing to write it under a checkpoint file name")


def check_not_foreign(path: PathLike, is_ours: Callable[[Path], bool], what: str) -> None:
    """An existing file under a name this command writes is replaced only if this package wrote
    it (``is_ours``): a user's own notes or config are never overwritten."""
    target = Path(path)
    if target.is_file() and not is_ours(target):
        raise OutputError(
            f"{target}: exists and was not written by mergekit-sdxl (it is not {what}); refusing to replace it "
            "(move it or choose another name)"
        )


class OwnOutputs:
    """Tells discovery which files are this command's own outputs rather than inputs: the paths
    it writes, and (unless asked otherwise) earlier mergekit-sdxl merges in the output folder."""

    def __init__(self, writes: Sequence[PathLike], merged_outputs_dir: Optional[PathLike]) -> None:
        self._writes = {_identity(Path(w)) for w in writes}
        self._writes_real = {real for real, _ in self._writes}
        self._writes_inodes = {inode for _, inode in self._writes if inode is not None}
        self._merged_dir = os.path.realpath(merged_outputs_dir) if merged_outputs_dir is not None else None

    def reason(self, path: Path) -> Optional[str]:
        """Why ``path`` is not an input, or None when it is one."""
        from mergekit_sdxl.io.provenance import is_merge_output

        real, inode = _identity(path)
        if real in self._writes_real or (inode is not None and inode in self._writes_inodes):
            return "this command's own output (never an input)"
        if self._merged_dir is not None and os.path.dirname(real) == self._merged_dir and is_merge_output(path):
            return "a mergekit-sdxl merge in the output folder (pass --include-merged to merge it too)"
        return None
