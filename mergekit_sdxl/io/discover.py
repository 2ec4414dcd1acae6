"""Find every ``*.safetensors`` file under a folder: recursive, deterministic, loop-safe, and
explicit about what it could not read.

:func:`discover_safetensors` follows symbolic links, but enters each real directory (its
``(st_dev, st_ino)``) once: a link back to a parent, two links to one folder, or a folder reached
by two paths cannot loop or list anything twice. A file reachable by several paths (links,
hard links) is listed once, by the path that sorts first. Results are sorted by relative POSIX
path. Unreadable folders and files, broken links and non-regular files that carry the suffix are
returned as :attr:`Discovery.problems`, never silently skipped. Hidden files (``.name``) are
skipped; hidden folders are searched, as before.

No mergekit or torch imports: this runs before anything heavy is loaded.
"""

from __future__ import annotations

import errno
import heapq
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Union

__all__ = ["Discovery", "discover_safetensors", "SUFFIX"]

PathLike = Union[str, "os.PathLike[str]"]

SUFFIX = ".safetensors"


@dataclass
class Discovery:
    """What :func:`discover_safetensors` found under ``root``.

    ``files``: paths under ``root`` (as reached, links not resolved), sorted by relative POSIX
    path. ``problems``: ``(path, reason)`` for each folder or file that could not be used, sorted
    the same way.
    """

    root: Path
    files: List[Path] = field(default_factory=list)
    problems: List[Tuple[Path, str]] = field(default_factory=list)


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _check_file(path: str) -> Tuple[Optional[os.stat_result], str]:
    """``(stat, "")`` for a readable regular file, else ``(None, why not)``."""
    try:
        st = os.stat(path)  # follows links
    except FileNotFoundError:
        return None, "broken symbolic link" if os.path.islink(path) else "vanished while listing"
    except OSError as e:
        return None, f"cannot stat: {_reason(e)}"
    if stat.S_ISDIR(st.st_mode):
        return None, "is a directory named like a checkpoint"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file (FIFO, socket or device)"
    # Open to be sure it is readable (permission bits, ACLs, root squash...). O_NONBLOCK: a file
    # replaced by a FIFO meanwhile must not block.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        return None, f"cannot read: {_reason(e)}"
    os.close(fd)
    return st, ""


def discover_safetensors(root: PathLike, suffix: str = SUFFIX) -> Discovery:
    """Every file named ``*<suffix>`` (case-insensitive) under ``root``, recursively.

    Raises :class:`NotADirectoryError` (``strerror`` says why) when ``root`` itself is missing, not
    a directory or not accessible; everything below it that cannot be read becomes a problem entry.
    """
    root_path = Path(root)
    try:
        root_st = os.stat(root_path)
    except OSError as e:
        why = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot access ({_reason(e)})"
        raise NotADirectoryError(errno.ENOTDIR, f"not a directory: {why}", str(root_path)) from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(root_path))

    suffix_l = suffix.lower()
    visited: Set[Tuple[int, int]] = set()
    found: Dict[Tuple[int, int], str] = {}  # real file -> smallest relative path seen
    problems: Dict[str, str] = {}
    # Directories in order of their relative path + "/": a child's key always sorts after its
    # parent's, so each real directory is first entered by the path under which its files sort
    # first (the "+ /" makes "a/x" sort after "a-b/x", as plain path order does).
    heap: List[Tuple[str, str]] = [("", "")]  # (key, relative POSIX path of the directory)
    while heap:
        _, rel_dir = heapq.heappop(heap)
        dir_path = os.path.join(root_path, rel_dir) if rel_dir else os.fspath(root_path)
        try:
            st = os.stat(dir_path)
        except OSError as e:
            problems[rel_dir or "."] = f"cannot open folder: {_reason(e)}"
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in visited:  # a loop, or a second path to a folder already searched
            continue
        visited.add(ident)
        try:
            with os.scandir(dir_path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems[rel_dir or "."] = f"cannot list folder: {_reason(e)}"
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError as e:
                problems[rel] = f"cannot stat: {_reason(e)}"
                continue
            if is_dir:
                heapq.heappush(heap, (rel + "/", rel))
                continue
            if entry.name.startswith(".") or not entry.name.lower().endswith(suffix_l):
                continue
            fst, why = _check_file(entry.path)
            if fst is None:
                problems[rel] = why
                continue
            fid = (fst.st_dev, fst.st_ino)
            if fid not in found or rel < found[fid]:
                found[fid] = rel
    files = [root_path / rel for rel in sorted(found.values())]
    probs = [(root_path / rel if rel != "." else root_path, problems[rel]) for rel in sorted(problems)]
    return Discovery(root=root_path, files=files, problems=probs)
