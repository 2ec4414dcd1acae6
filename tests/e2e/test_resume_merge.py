"""Issue 6 end to end: an interrupted ``mergekit-sdxl merge`` resumes to the identical file.

Every merge here runs the CLI in its own process, writing real files. Runs are
killed with SIGKILL (or interrupted with SIGINT) at points chosen by polling the size of
``OUT.partial`` from outside, then the same command is run again. The finished file must be
byte-identical to an uninterrupted run, the printed sha256/AutoV2 must be hashlib's of the final
file, and nothing may ever exist under the output name before it is complete.

Cost: a fresh interpreter spends most of a small merge importing mergekit (transformers, peft).
So the reference merge runs the ``mergekit-sdxl`` console script, and the other runs are forked,
already imported, from a small fork server (``_FORK_SERVER``): each is still its own process
running the CLI's ``main()`` with its own argv, stdout, stderr and exit status, and SIGKILL and
SIGINT reach it as they would reach the console script. ``MERGEKIT_SDXL_TEST_NO_FORK=1`` runs
every merge through the console script instead (slower). Each scenario is one chain of runs
(interrupt, resume, interrupt, ... finish) rather than a fresh merge per kill point.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import yaml

pytestmark = pytest.mark.slow  # every test here starts mergekit-sdxl / mergekit-yaml processes

BIN = Path(sys.executable).parent
MERGEKIT_SDXL = str(BIN / "mergekit-sdxl")
OUT_NAME = "merged.safetensors"  # the same file name everywhere: its stem is in the metadata
N_MODELS = 3  # base + 2 fine-tunes at width 1/16, ~40 MB each
BUDGET = "64MB"
POLL_S = 0.02
PHASE_TIMEOUT_S = 300
# Logged (with -v) by the driver after preflight, right before mergekit plans the merge.
PLANNING_MARKER = "INFO mergekit_sdxl.host.driver:"
RESUME_MESSAGE = "run the same command again to resume"


# --------------------------------------------------------------------------- helpers


@dataclass
class Reference:
    """An uninterrupted merge: its bytes and its layout (absolute byte spans in file order)."""

    data: bytes
    sha256: str
    stdout: str
    header_len: int
    spans: List[Tuple[str, int, int]]

    @property
    def size(self) -> int:
        return len(self.data)


def _layout(data: bytes) -> Tuple[int, List[Tuple[str, int, int]]]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    spans = sorted(
        ((k, base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
        key=lambda s: (s[1], s[2]),
    )
    return base, spans


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_config(path: Path, inputs: Sequence[Path], seed: int = 7) -> Path:
    base, *models = inputs
    config = {
        "merge_method": "ties_soup",
        "base_model": {"model": {"path": str(base)}},
        "models": [{"model": {"model": {"path": str(m)}}} for m in models],
        "dtype": "float32",
        "parameters": {"seed": seed},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _write_inputs(folder: Path) -> List[Path]:
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.safetensors"
    write_synthetic_sdxl(base, seed=0)
    paths = [base]
    for i in range(1, N_MODELS):
        path = folder / f"ft{i}.safetensors"
        write_synthetic_sdxl(path, seed=i, base=base)
        paths.append(path)
    return paths


class Merge:
    """One ``mergekit-sdxl merge`` process, watched from outside through its files."""

    def __init__(self, config: Path, out: Path, launcher: Launcher, extra: Sequence[str] = (), tag: str = "run"):
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        self.journal = out.with_name(out.name + ".partial.journal")
        self.stdout_path = out.with_name(f"{tag}.stdout")
        self.stderr_path = out.with_name(f"{tag}.stderr")
        self.args = [MERGEKIT_SDXL, "-v", "merge", "-v", str(config), str(out), "--quiet", *extra]
        self.proc = launcher.start(self.args, self.stdout_path, self.stderr_path)
        _LIVE.append(self.proc)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def partial_size(self) -> int:
        try:
            return self.partial.stat().st_size
        except FileNotFoundError:
            return -1

    def _describe(self) -> str:
        return f"{' '.join(self.args)}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr[-4000:]}"

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Poll until ``condition``; the output name must stay absent all along."""
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while not condition():
            assert not self.out.exists(), f"{self.out} exists while the merge is still running ({what})"
            if self.proc.poll() is not None:
                pytest.fail(f"merge exited ({self.proc.returncode}) before {what}:\n{self._describe()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self._describe()}")
            time.sleep(POLL_S)
        assert not self.out.exists(), f"{self.out} exists while the merge is still running ({what})"

    def wait_for_size(self, fraction: float, total: int) -> None:
        target = int(total * fraction)
        self.wait_for(lambda: self.partial_size() >= target, f"{self.partial.name} >= {fraction:.0%} of {total} bytes")

    def interrupt(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=PHASE_TIMEOUT_S)
        assert not self.out.exists(), f"{self.out} exists after the merge was interrupted"
        return rc

    def finish(self) -> int:
        try:
            rc = self.proc.wait(timeout=PHASE_TIMEOUT_S * 2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"merge did not finish:\n{self._describe()}")
        return rc


_LIVE: list = []


def _default_sigint() -> None:
    # A pytest started in the background (``pytest &`` in a script) ignores SIGINT, and an ignored
    # SIGINT is inherited through exec: Python would then never raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Launcher:
    """Starts ``mergekit-sdxl`` processes with the test environment; ``start`` returns a Popen-like."""

    def __init__(self, env: Dict[str, str]):
        self.env = env

    def start(self, args: Sequence[str], stdout: Path, stderr: Path):
        with open(stdout, "w") as so, open(stderr, "w") as se:
            return subprocess.Popen(list(args), stdout=so, stderr=se, env=self.env, preexec_fn=_default_sigint)

    def close(self) -> None:
        pass


# A process that imports the CLI once, then forks one child per merge. A child redirects its
# stdout/stderr to the given files and runs ``main()`` like the console script
# (``sys.exit(main())``); the server reports its pid and, when asked, its exit status in
# ``Popen.returncode`` form (negative: killed by that signal).
_FORK_SERVER = r"""
import json, os, signal, sys, traceback

signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C on pytest is not for the server
from mergekit_sdxl.cli.main import main
import mergekit_sdxl.cli.merge_cmd, mergekit_sdxl.host.driver  # the slow imports, once


def child(request):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = request["argv"]
    code = 0
    try:
        main()
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # die of SIGINT, as CPython does
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            child(request)
        reply = pid
    else:  # "poll"
        done, status = os.waitpid(request["pid"], os.WNOHANG)
        reply = os.waitstatus_to_exitcode(status) if done else None
    print(json.dumps(reply), flush=True)
"""


class _Forked:
    """Popen-like view of a child of the fork server."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self.server.call({"op": "poll", "pid": self.pid})
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(POLL_S)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped yet, so the pid is still this child's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer(Launcher):
    def __init__(self, env: Dict[str, str], log: Path):
        super().__init__(env)
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
            preexec_fn=_default_sigint,
        )

    def call(self, request: dict):
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died; see {self._log.name}")
        return json.loads(line)

    def start(self, args: Sequence[str], stdout: Path, stderr: Path) -> _Forked:
        argv = ["mergekit-sdxl", *args[1:]]
        stdout.write_text("")  # exist before the child opens them: the caller may read at once
        stderr.write_text("")
        return _Forked(self, self.call({"op": "spawn", "argv": argv, "stdout": str(stdout), "stderr": str(stderr)}))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._log.close()


@pytest.fixture(autouse=True)
def _no_stray_merges():
    yield
    while _LIVE:
        proc = _LIVE.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def _journal(m: Merge) -> Optional[dict]:
    try:
        return json.loads(m.journal.read_text())
    except FileNotFoundError:
        return None


def _check_partial(ref: Reference, m: Merge) -> dict:
    """After an interruption: no output, and whatever the journal claims is already the final bytes."""
    assert not m.out.exists()
    state = _journal(m)
    if state is None:
        return {"completed": 0, "offset": 0}
    size = m.partial_size()
    assert state["offset"] <= size, (state, size)
    assert state["total_entries"] == len(ref.spans)
    # The journal ends exactly where a tensor ends (a torn tensor is never claimed) ...
    expected_end = ref.header_len if state["completed"] == 0 else ref.spans[state["completed"] - 1][2]
    assert state["offset"] == expected_end, (state, expected_end)
    # ... and everything it claims, header included, is byte for byte the uninterrupted file.
    with open(m.partial, "rb") as fh:
        prefix = fh.read(state["offset"])
    assert prefix == ref.data[: state["offset"]], "journaled prefix differs from the uninterrupted merge"
    assert state["prefix_sha256"] == hashlib.sha256(prefix).hexdigest()
    return state


def _check_final(ref: Reference, m: Merge, rc: int) -> None:
    assert rc == 0, m._describe()
    data = m.out.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert len(data) == ref.size
    assert digest == ref.sha256 and data == ref.data, "resumed merge is not byte-identical to the uninterrupted one"
    assert f"sha256 {digest}" in m.stdout, m.stdout
    assert f"AutoV2 {digest[:10]}" in m.stdout, m.stdout
    assert not m.partial.exists() and not m.journal.exists()
    assert not list(m.out.parent.glob(f".{m.journal.name}.*.tmp")), "stale journal temp files left behind"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def merge_env(work) -> Dict[str, str]:
    return dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        # Tiny tensors: one torch thread is several times faster than many on a loaded machine.
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MERGEKIT_SDXL_CACHE_DIR=str(work / "hash-cache"),
        HF_HUB_OFFLINE="1",
    )


@pytest.fixture(scope="module")
def launcher(work, merge_env):
    if os.environ.get("MERGEKIT_SDXL_TEST_NO_FORK"):
        launcher = Launcher(merge_env)
    else:
        launcher = ForkServer(merge_env, work / "fork-server.log")
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def inputs(work) -> List[Path]:
    return _write_inputs(work / "inputs")


@pytest.fixture(scope="module")
def config(work, inputs) -> Path:
    return _write_config(work / "config.yaml", inputs)


@pytest.fixture(scope="module")
def reference(work, config, merge_env, launcher) -> Reference:
    # (``launcher`` first: the fork server imports while the reference merge runs.)
    out_dir = work / "reference"
    out_dir.mkdir()
    # The real console script, as a user runs it (the other runs may be forked: see the top).
    m = Merge(config, out_dir / OUT_NAME, Launcher(merge_env), tag="reference")
    rc = m.finish()
    assert rc == 0, m._describe()
    data = m.out.read_bytes()
    header_len, spans = _layout(data)
    return Reference(data=data, sha256=hashlib.sha256(data).hexdigest(), stdout=m.stdout, header_len=header_len, spans=spans)


def _run_dir(work: Path, name: str) -> Path:
    path = work / name
    path.mkdir()
    return path


# --------------------------------------------------------------------------- tests


def test_uninterrupted_merge_prints_the_hashes_of_its_bytes(reference, work):
    digest = reference.sha256
    assert f"sha256 {digest}" in reference.stdout
    assert f"AutoV2 {digest[:10]}" in reference.stdout
    out = work / "reference" / OUT_NAME
    assert not Path(str(out) + ".partial").exists() and not Path(str(out) + ".partial.journal").exists()
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert digest in json.dumps(sidecar)
    assert len(reference.spans) > 2000  # the whole SDXL key set


def test_sigkill_at_several_points_resumes_to_identical_bytes(reference, config, launcher, merge_env, work):
    out = _run_dir(work, "sigkill") / OUT_NAME

    # 1. Killed while mergekit plans, before the writer exists: nothing is left behind.
    m = Merge(config, out, launcher, tag="r0-planning")
    m.wait_for(lambda: PLANNING_MARKER in m.stderr, "the merge to start planning")
    m.interrupt()
    assert not m.partial.exists() and not m.journal.exists(), "a file was written during planning"

    # 2-4. Killed at 10%, 50% and 90% of the final size, each run resuming the one before.
    # The 50% run resumes with --memory-budget 64MB (the budget is not part of a merge's identity:
    # a merge killed for lack of memory resumes with a smaller one) and so redoes the big
    # embeddings through the chunked out-of-core path.
    completed = 0
    for fraction, extra in ((0.10, ()), (0.50, ("--memory-budget", BUDGET)), (0.90, ())):
        m = Merge(config, out, launcher, extra=extra, tag=f"r{int(fraction * 100)}")
        m.wait_for_size(fraction, reference.size)
        assert m.interrupt() == -signal.SIGKILL
        if completed:
            assert f"resuming: {completed} of {len(reference.spans)} tensors done" in m.stderr, "the run did not resume"
        state = _check_partial(reference, m)
        assert state["completed"] >= completed, "the journal went backwards"
        completed = state["completed"]
    assert completed > 0, "no checkpoint by 90%: the last run would not resume anything"

    # 5. The same command finishes the file, from a new interpreter as after a reboot (forked runs
    # share the fork server's hash seed; the header and the identity must not depend on it).
    m = Merge(config, out, Launcher(merge_env), tag="final")
    rc = m.finish()
    assert f"resuming: {completed} of {len(reference.spans)} tensors done" in m.stderr, "the final run did not resume"
    _check_final(reference, m, rc)


def test_chunked_tensor_killed_in_flight_is_redone(reference, config, launcher, work):
    # The biggest tensor (the OpenCLIP token embedding) is merged in row chunks under 64MB:
    # the planner chunks a tensor when N inputs plus 3 working copies in float32 exceed the budget.
    name, start, end = max(reference.spans, key=lambda s: s[2] - s[1])
    numel = (end - start) // 2  # stored as float16
    assert numel * 4 * (N_MODELS + 3) > 64 * 1024**2, "the budget would not chunk anything"
    out = _run_dir(work, "chunked") / OUT_NAME

    m = Merge(config, out, launcher, extra=("--memory-budget", BUDGET), tag="chunked-killed")
    # Everything before the chunked tensor is on disk: it is being merged now (it takes a while).
    m.wait_for(lambda: m.partial_size() >= start, f"the merge to reach {name}")
    m.interrupt()
    assert m.partial_size() < end, f"{name} was already written when the kill landed; the kill came too late"
    state = _check_partial(reference, m)
    assert state["offset"] <= start, "the journal claims a tensor that was never finished"

    m = Merge(config, out, launcher, extra=("--memory-budget", BUDGET), tag="chunked-final")
    _check_final(reference, m, m.finish())  # also: chunked bytes == the unbudgeted reference's bytes


def test_ctrl_c_leaves_a_resumable_partial(reference, config, launcher, work):
    out = _run_dir(work, "sigint") / OUT_NAME
    m = Merge(config, out, launcher, tag="interrupted")
    m.wait_for_size(0.5, reference.size)
    rc = m.interrupt(signal.SIGINT)
    assert rc == 130, m._describe()
    assert RESUME_MESSAGE in m.stderr, m.stderr
    assert "Traceback" not in m.stderr, m.stderr
    assert m.partial.exists() and m.journal.exists()
    state = _check_partial(reference, m)
    # Ctrl-C checkpoints on the way out: the journal covers every tensor that reached the disk
    # (at most the one being written when the signal came is beyond it, and is redone).
    size = m.partial_size()
    following = next((e - s for _, s, e in reference.spans if s == state["offset"]), 0)
    assert size == state["offset"] or size - state["offset"] < following, (size, state)
    assert state["completed"] > 0

    m = Merge(config, out, launcher, tag="resumed")
    rc = m.finish()
    assert f"resuming: {state['completed']} of {len(reference.spans)} tensors done" in m.stderr, "the rerun did not resume"
    _check_final(reference, m, rc)


def test_changed_config_or_input_refuses_to_resume(launcher, work):
    """Own inputs (one is rewritten here), so this test needs no reference merge."""
    folder = _run_dir(work, "changed")
    inputs = _write_inputs(folder / "inputs")
    config = _write_config(folder / "config.yaml", inputs, seed=7)
    out = folder / "out" / OUT_NAME
    out.parent.mkdir()

    m = Merge(config, out, launcher, tag="original")
    size_goal = inputs[0].stat().st_size  # the output is about the size of one input
    m.wait_for_size(0.6, size_goal)
    m.interrupt()
    state = _journal(m)
    assert state is not None and state["completed"] > 0, "no checkpoint to resume from"
    partial_bytes = m.partial.read_bytes()
    stale_prefix = partial_bytes[: state["offset"]]
    journal_text = m.journal.read_text()

    def refused(m: Merge, what: str) -> None:
        rc = m.finish()
        assert rc == 2, m._describe()
        assert "--restart" in m.stderr and what in m.stderr, m.stderr
        assert "Traceback" not in m.stderr, m.stderr
        assert not m.out.exists()
        # Refusing leaves the partial output alone (the original command could still resume it).
        assert m.journal.read_text() == journal_text
        assert m.partial.read_bytes() == partial_bytes

    # Another seed: refused, naming the config.
    other = _write_config(folder / "other-seed.yaml", inputs, seed=8)
    refused(Merge(other, out, launcher, tag="other-seed"), "changed fields: config")

    # One input rewritten with other content (and so a new mtime and sha256): refused, naming it.
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    changed = inputs[2]
    before = changed.stat()
    old_sha = _sha256(changed)
    write_synthetic_sdxl(changed, seed=99, base=inputs[0])
    if changed.stat().st_mtime_ns == before.st_mtime_ns:  # coarse clock: make the change visible
        os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    new_sha = _sha256(changed)
    assert new_sha != old_sha and changed.stat().st_size == before.st_size
    refused(Merge(config, out, launcher, tag="changed-input"), f"changed fields: input {changed}")

    # --restart discards the partial and merges the new inputs from scratch.
    (folder / "fresh").mkdir()
    m = Merge(config, out, launcher, extra=("--restart",), tag="restart")
    rc = m.finish()
    assert rc == 0, m._describe()
    data = m.out.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert f"sha256 {digest}" in m.stdout and f"AutoV2 {digest[:10]}" in m.stdout
    assert not m.partial.exists() and not m.journal.exists()
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        recorded = json.loads(handle.metadata()["mergekit_sdxl.inputs"])
    assert [r["sha256"] for r in recorded] == [_sha256(p) for p in inputs]
    assert new_sha in [r["sha256"] for r in recorded] and old_sha not in [r["sha256"] for r in recorded]
    # Nothing of the stale partial survives: every merged tensor it held (one that differs from the
    # base, so it depends on the rewritten input) is different now.
    def tensors(blob: bytes) -> Dict[str, bytes]:
        _, spans = _layout(blob)
        return {k: blob[s:e] for k, s, e in spans if e <= len(blob)}

    new, base = tensors(data), tensors(inputs[0].read_bytes())
    checked = 0
    for key, stale in tensors(stale_prefix).items():
        if len(stale) < 512 or stale == base[key]:
            continue  # tiny, or taken from the base (VAE, ...): the same before and after
        assert new[key] != stale, f"{key} still holds the stale partial's bytes"
        checked += 1
    assert checked > 100, checked

    # And it is what an uninterrupted merge of the new inputs gives, byte for byte.
    fresh = Merge(config, folder / "fresh" / OUT_NAME, launcher, tag="fresh")
    assert fresh.finish() == 0, fresh._describe()
    assert fresh.out.read_bytes() == data
