"""Folder discovery (io/discover.py) and escaping of file-supplied text (io/text.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_sdxl.io.discover import Discovery, discover_safetensors
from mergekit_sdxl.text import printable
from tests.paths import REPO


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def _rel(found: Discovery, root: Path):
    return [p.relative_to(root).as_posix() for p in found.files]


def _permissions_enforced(tmp_path: Path) -> bool:
    """chmod 000 blocks listing here (not as root, not on every file system)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0)
    try:
        os.listdir(probe)
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
        probe.rmdir()


def test_recursive_sorted_hidden_skipped(tmp_path):
    for rel in ["b.safetensors", "a/z.SAFETENSORS", "a-b/y.safetensors", "a/sub/x.safetensors", ".hidden.safetensors",
                "notes.txt", ".cache/c.safetensors"]:
        _touch(tmp_path / rel)
    found = discover_safetensors(tmp_path)
    names = _rel(found, tmp_path)
    # sorted by relative POSIX path ("a-b/" before "a/"); hidden files skipped, hidden folders searched
    assert names == [".cache/c.safetensors", "a-b/y.safetensors", "a/sub/x.safetensors", "a/z.SAFETENSORS", "b.safetensors"]
    assert found.problems == [] and found.root == tmp_path
    assert _rel(discover_safetensors(tmp_path), tmp_path) == names  # deterministic


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_loops_terminate_and_list_each_file_once(tmp_path):
    root = tmp_path / "root"
    _touch(root / "m.safetensors")
    _touch(root / "d" / "n.safetensors")
    os.symlink("..", root / "d" / "up")  # back to root
    os.symlink("..", root / "d" / "up2")  # twice
    os.symlink(".", root / "d" / "self")
    os.symlink(root / "d", root / "alias_of_d")  # the same folder by a second path
    os.symlink(root / "m.safetensors", root / "d" / "link_to_m.safetensors")  # one file, two paths
    found = discover_safetensors(root)
    names = _rel(found, root)
    assert sorted(set(names)) == names
    # each real file once, by its first path in sorted order (m.safetensors is also reachable, and
    # sorts first, as alias_of_d/link_to_m.safetensors)
    assert names == ["alias_of_d/link_to_m.safetensors", "alias_of_d/n.safetensors"]
    assert found.problems == []


def test_file_reached_twice_keeps_first_sorted_path(tmp_path):
    _touch(tmp_path / "b" / "f.safetensors")
    os.symlink(tmp_path / "b" / "f.safetensors", tmp_path / "a.safetensors")
    assert _rel(discover_safetensors(tmp_path), tmp_path) == ["a.safetensors"]


def test_broken_links_and_fifos_are_reported(tmp_path):
    _touch(tmp_path / "ok.safetensors")
    os.symlink(tmp_path / "gone.safetensors", tmp_path / "dangling.safetensors")
    os.mkfifo(tmp_path / "pipe.safetensors")
    found = discover_safetensors(tmp_path)
    assert _rel(found, tmp_path) == ["ok.safetensors"]
    problems = {p.name: why for p, why in found.problems}
    assert problems == {"dangling.safetensors": "broken symbolic link", "pipe.safetensors": "not a regular file (FIFO, socket or device)"}


def test_unreadable_subfolder_and_file_are_reported(tmp_path):
    if not _permissions_enforced(tmp_path):
        pytest.skip("permissions are not enforced here (running as root?)")
    _touch(tmp_path / "ok.safetensors")
    locked = tmp_path / "locked"
    _touch(locked / "hidden_inside.safetensors")
    secret = _touch(tmp_path / "secret.safetensors")
    locked.chmod(0)
    secret.chmod(0)
    try:
        found = discover_safetensors(tmp_path)
    finally:
        locked.chmod(0o755)
        secret.chmod(0o644)
    assert _rel(found, tmp_path) == ["ok.safetensors"]
    problems = {p.relative_to(tmp_path).as_posix(): why for p, why in found.problems}
    assert set(problems) == {"locked", "secret.safetensors"}
    assert "Permission denied" in problems["locked"] and "Permission denied" in problems["secret.safetensors"]


def test_unreadable_subfolder_simulated(tmp_path, monkeypatch):
    """The reporting path itself, even as root: listing one folder and opening one file fail."""
    import mergekit_sdxl.io.discover as disc

    _touch(tmp_path / "ok.safetensors")
    _touch(tmp_path / "locked" / "inside.safetensors")
    _touch(tmp_path / "secret.safetensors")
    real_scandir, real_open = os.scandir, os.open

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def fake_open(path, flags, *a):
        if Path(path).name == "secret.safetensors":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(disc.os, "scandir", scandir)
    monkeypatch.setattr(disc.os, "open", fake_open)
    found = discover_safetensors(tmp_path)
    assert _rel(found, tmp_path) == ["ok.safetensors"]
    assert [(p.relative_to(tmp_path).as_posix(), why) for p, why in found.problems] == [
        ("locked", "cannot list folder: Permission denied"),
        ("secret.safetensors", "cannot read: Permission denied"),
    ]


@pytest.mark.slow
def test_unreadable_subfolder_via_subprocess_as_nobody(tmp_path):
    """Root ignores chmod 000: repeat the check as an unprivileged user when we can become one."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("covered by test_unreadable_subfolder_and_file_are_reported")
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    root = tmp_path / "tree"
    _touch(root / "ok.safetensors")
    _touch(root / "locked" / "x.safetensors")
    for d in (tmp_path, root):
        d.chmod(0o755)
    (root / "locked").chmod(0)
    (root / "ok.safetensors").chmod(0o644)
    code = (
        "import sys; from mergekit_sdxl.io.discover import discover_safetensors as d; r = d(sys.argv[1]); "
        "print([p.name for p in r.files]); print([(p.name, w) for p, w in r.problems])"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def demote() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    try:
        out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env,
                             preexec_fn=demote, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot run as nobody: {e}")
    finally:
        (root / "locked").chmod(0o755)
    if out.returncode != 0:
        pytest.skip(f"cannot run as nobody: {out.stderr[-300:]}")
    files, problems = out.stdout.strip().splitlines()
    assert files == "['ok.safetensors']"
    assert "('locked', 'cannot list folder: Permission denied')" in problems


def test_root_errors(tmp_path):
    with pytest.raises(NotADirectoryError, match="does not exist"):
        discover_safetensors(tmp_path / "missing")
    f = _touch(tmp_path / "file.safetensors")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        discover_safetensors(f)


@pytest.mark.slow
def test_no_heavy_imports():
    code = "import sys, mergekit_sdxl.io.discover, mergekit_sdxl.text; print('torch' in sys.modules, 'mergekit' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("plain name.safetensors", "plain name.safetensors"),
        ("日本語モデル_v2.safetensors", "日本語モデル_v2.safetensors"),
        ("esc\x1b[2Jx", "esc\\x1b[2Jx"),
        ("cr\rlf\nnul\x00tab\t", "cr\\x0dlf\\x0anul\\x00tab\\x09"),
        ("del\x7f c1\x85\x9b", "del\\x7f c1\\x85\\x9b"),
        ("bidi\u202etxt.exe\u202c", "bidi\\u202etxt.exe\\u202c"),
        ("iso\u2066x\u2069", "iso\\u2066x\\u2069"),
        ("zw\u200bsp", "zw\\u200bsp"),
        ("undecodable\udcff", "undecodable\\udcff"),
    ],
)
def test_printable(raw, shown):
    assert printable(raw) == shown
    assert printable(shown) == shown  # idempotent
    printable(raw).encode("utf-8")  # always encodable
    assert printable(raw).isprintable()


def test_printable_non_str():
    assert printable(Path("a\x1bb")) == "a\\x1bb"
    assert printable(3) == "3"
