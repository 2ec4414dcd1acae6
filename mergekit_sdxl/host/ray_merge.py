"""``mergekit-sdxl merge --ray-address``: the planned keys as Ray tasks, written into one file.

The keys of a merge are independent (docs/scaling.md): each output key's task subgraph (its
``OutputTensor`` target, pickled) is run by a Ray worker, which reads the key's byte ranges from
the input paths itself (the same paths on every node: shared storage) with the same kernels and
memory plan, and returns the finished tensor. The driver writes the tensors into the one output
file, in entry order, through the writer of a single-process merge (journal, resume, provenance),
so the file is byte-identical to it.

Jobs are whole keys; keys that read little are batched with their neighbours in output order,
so Ray's per-task cost is paid once per batch. The driver keeps a window over the output order:
only jobs whose output lies within ``window_bytes`` of the next entry to write are submitted,
the ones that read most first, at most two per worker at a time; finished tensors wait in Ray's
object store, not in the driver, until their turn. A worker that dies mid-job is replaced and the
job rerun by Ray (``max_retries``); a job is a pure function of its inputs, so the rerun gives
the same bytes. Ray is an optional extra, imported only when a Ray merge runs.
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import threading
import time
import uuid
from bisect import bisect_right
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from tqdm.auto import tqdm

from mergekit_sdxl.errors import UsageError, UserError
from mergekit_sdxl.host.checkpoint import SDXLCheckpointLoader
from mergekit_sdxl.host.merge_planning import expected_read_bytes
from mergekit_sdxl.host.mergekit_api import LoaderCache, MergeOptions, mergekit_version
from mergekit_sdxl.host.streaming import StreamingExecutor, bytes_read
from mergekit_sdxl.host.tasks import OutputTensor
from mergekit_sdxl.io.hashing import sample_digest
from mergekit_sdxl.io.writer import StreamingCheckpointWriter, TensorEntrySpec
from mergekit_sdxl.version import __version__
from mergekit_sdxl.workflow.options import MIN_BUDGET, SDXLOptions, default_memory_budget

LOG = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'mergekit-sdxl[ray]'"
LOCAL = "local"
DEFAULT_WINDOW_BYTES = 1 << 30  # output bytes finished ahead of the writer, held by Ray's object store
MAX_RETRIES = 3  # reruns of a job whose worker died (Ray's own default, made explicit)
# Keys reading less than this are batched with their neighbours: at full width every weight of
# more than a few inputs is a job of its own, the ~1500 biases and norms are batches.
BATCH_BYTES = 8 << 20
BATCH_KEYS = 64


class RayUnavailable(UsageError):
    """``--ray-address`` without Ray installed."""


class RayMergeError(UserError, RuntimeError):
    """A Ray merge that cannot run or finish (no cluster, a job that keeps losing its worker)."""


@dataclass(frozen=True)
class RaySettings:
    """Where a merge runs on Ray. ``address``: ``local`` (start a cluster of ``workers`` worker
    processes on this machine, default: its cores), or a Ray address (``auto``, ``HOST:6379``),
    where ``workers`` caps the keys merged at once (default: the cluster's CPUs)."""

    address: str
    workers: Optional[int] = None
    window_bytes: int = DEFAULT_WINDOW_BYTES
    max_retries: int = MAX_RETRIES

    @property
    def local(self) -> bool:
        return self.address == LOCAL


@dataclass(frozen=True)
class RayRunStats:
    """What a Ray merge did: jobs run, workers used, bytes the workers read (a rerun job counts
    again), the most output bytes submitted but not yet written (bounded by the window), and its
    seconds: to join or start the cluster, to the first finished job (the workers' start-up: each
    imports torch and mergekit once), to the last entry written."""

    jobs: int
    workers: int
    bytes_read: int
    max_unwritten_bytes: int
    window_bytes: int
    connect_seconds: float = 0.0
    first_result_seconds: float = 0.0
    seconds: float = 0.0


def require_ray() -> ModuleType:
    """The ``ray`` module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError as error:
        raise RayUnavailable(f"--ray-address needs Ray, an optional extra: {RAY_EXTRA}") from error
    return ray


def ray_settings(address: Optional[str], workers: Optional[int]) -> Optional[RaySettings]:
    """The settings of the CLI's ``--ray-address`` / ``--ray-workers`` (None: no Ray)."""
    if address is None:
        if workers is not None:
            raise UsageError("--ray-workers: give --ray-address too (local, auto or HOST:PORT)")
        return None
    if not address.strip():
        raise UsageError("--ray-address: give local, auto or HOST:PORT")
    if workers is not None and workers < 1:
        raise UsageError(f"--ray-workers {workers}: give at least 1")
    settings = RaySettings(address=address.strip(), workers=workers)
    require_ray()
    return settings


def check_ray_merge(settings: RaySettings, options: MergeOptions, devices: Optional[Sequence[str]] = None) -> None:
    """Refuse, before any work, what a Ray merge cannot do."""
    require_ray()
    if options.multi_gpu or devices:
        raise UsageError("--ray-address and --multi-gpu: choose one (with --cuda, Ray gives each job a GPU of its own)")
    device = str(options.device or "cpu")
    if device.startswith("cuda") and device != "cuda":
        raise UsageError(f"--device {device} with --ray-address: use --cuda (Ray gives each job a GPU of its own)")
    _probe(settings.address)


def _probe(address: str) -> None:
    """A ``HOST:PORT`` where nothing listens is refused at once (Ray itself retries for minutes)."""
    import socket

    if address in (LOCAL, "auto"):
        return
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        if "://" in address:
            return  # a Ray client address without a port: Ray's default applies
        raise UsageError(f"--ray-address {address}: give local, auto or HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as error:
        raise RayMergeError(
            f"--ray-address {address}: nothing answers there ({error.strerror or error}); "
            "start the cluster's head with `ray start --head` on that machine"
        ) from error


def local_workers(settings: RaySettings, threads: int) -> int:
    """Worker processes of a local cluster: as given, else one per ``threads`` cores."""
    return settings.workers or max(1, (os.cpu_count() or 1) // threads)


def worker_budget(sdxl: SDXLOptions, settings: RaySettings, threads: int = 1) -> int:
    """The memory budget of each worker: ``--memory-budget`` as given; by default, on a local
    cluster, the default budget shared by its workers (the bytes do not depend on the budget)."""
    if sdxl.memory_budget is not None or not settings.local:
        return sdxl.memory_budget_bytes
    return max(MIN_BUDGET, default_memory_budget() // local_workers(settings, threads))


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class _Job:
    """Consecutive output entries merged by one Ray task; no targets: marker entries (v_pred /
    ztsnr), written empty by the driver."""

    index: int
    names: Tuple[str, ...]
    targets: Tuple[OutputTensor, ...]
    cost: int  # input bytes the job reads
    out_bytes: int


def plan_jobs(
    order: Sequence[str], targets: Mapping[str, OutputTensor], entries: Sequence[TensorEntrySpec]
) -> List[_Job]:
    """The pending entries ``order`` as jobs, in output order."""
    sizes = {entry.name: _entry_bytes(entry) for entry in entries}
    jobs: List[_Job] = []
    batch: List[Tuple[str, OutputTensor, int]] = []

    def add(names: Sequence[str], tasks: Sequence[OutputTensor], cost: int) -> None:
        jobs.append(_Job(len(jobs), tuple(names), tuple(tasks), cost, sum(sizes.get(n, 0) for n in names)))

    def flush() -> None:
        if batch:
            add([n for n, _, _ in batch], [t for _, t, _ in batch], sum(c for _, _, c in batch))
            batch.clear()

    for name in order:
        task = targets.get(name)
        if task is None:
            flush()
            add([name], [], 0)
            continue
        cost = expected_read_bytes([(name, task)])
        if cost >= BATCH_BYTES:
            flush()
            add([name], [task], cost)
            continue
        batch.append((name, task, cost))
        if sum(c for _, _, c in batch) >= BATCH_BYTES or len(batch) >= BATCH_KEYS:
            flush()
    flush()
    return jobs


def _entry_bytes(entry: TensorEntrySpec) -> int:
    numel = 1
    for dim in entry.shape:
        numel *= int(dim)
    return numel * torch.empty((), dtype=entry.dtype).element_size()


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _WorkerSetup:
    """What every job of one merge needs on its worker besides its targets."""

    merge_id: str
    options: MergeOptions
    device: str
    cwd: str  # relative input paths resolve against the driver's working directory
    threads: int
    inputs: Tuple[Tuple[str, str], ...]  # (absolute path, sample digest) as the driver sees them
    versions: Tuple[Tuple[str, str], ...]  # (package, version) of the driver: the bytes depend on them


_prepared: Optional[str] = None


def _prepare(setup: _WorkerSetup) -> None:
    """Once per merge and worker process: the plugin registered, fresh loaders, the inputs
    checked to be the driver's files (same path, same size and samples)."""
    global _prepared
    if _prepared != setup.merge_id:
        from mergekit_sdxl.host.plugin import register_all

        register_all()
        if setup.cwd and os.path.isdir(setup.cwd) and os.getcwd() != setup.cwd:
            os.chdir(setup.cwd)
        for loader in LoaderCache.loaders.values():  # an earlier merge's files may have changed since
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        LoaderCache.loaders.clear()
        _check_same_versions(setup.versions)
        for path, digest in setup.inputs:
            _check_same_file(path, digest)
        torch.set_num_threads(setup.threads)
        _prepared = setup.merge_id
    LoaderCache().setup(options=setup.options)


def _versions() -> Tuple[Tuple[str, str], ...]:
    return (("mergekit-sdxl", __version__), ("mergekit", mergekit_version()), ("torch", torch.__version__))


def _check_same_versions(driver: Sequence[Tuple[str, str]]) -> None:
    """A node with other versions of the packages could give other bytes: refused."""
    import socket

    mine = dict(_versions())
    for package, version in driver:
        if mine.get(package) != version:
            raise RayMergeError(
                f"Ray node {socket.gethostname()} has {package} {mine.get(package)}, the driver {version}; "
                "install the same versions on every node"
            )


def _check_same_file(path: str, digest: str) -> None:
    import socket

    where = socket.gethostname()
    try:
        mine = sample_digest(path)
    except OSError as error:
        raise RayMergeError(
            f"{path}: not readable on Ray node {where} ({error.strerror}); every node needs the inputs at the same paths"
        ) from error
    if mine != digest:
        raise RayMergeError(
            f"{path}: on Ray node {where} this is not the driver's file; every node needs the same inputs at the same paths"
        )


# A finished tensor as it travels: (dtype name, shape, its bytes as a uint8 numpy array). Ray
# moves numpy arrays through its object store without pickling them (the driver maps them in
# place); a torch tensor would be pickled, storage and all, on both sides.
_Wire = Tuple[str, Tuple[int, ...], Any]


def _to_wire(tensor: torch.Tensor) -> _Wire:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), flat.view(torch.uint8).numpy()


def _from_wire(wire: _Wire) -> torch.Tensor:
    import warnings

    dtype, shape, data = wire
    with warnings.catch_warnings():
        # The object store's buffers are read-only; the writer only reads the bytes.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return raw.view(getattr(torch, dtype)).reshape(shape)


def _merge_job(setup: _WorkerSetup, targets: Sequence[OutputTensor]) -> Tuple[List[Optional[_Wire]], int]:
    """The Ray task: merge ``targets`` on this worker; their values in order, and the bytes read."""
    _prepare(setup)
    start = bytes_read()
    executor = StreamingExecutor(
        list(targets), math_device=torch.device(setup.device), storage_device=torch.device("cpu")
    )
    values: Dict[str, Optional[torch.Tensor]] = {task.name: value for task, value in executor.run(quiet=True)}
    wires: List[Optional[_Wire]] = []
    for task in targets:
        value = values.get(task.name)
        wires.append(None if value is None else _to_wire(value))
    return wires, bytes_read() - start


# --------------------------------------------------------------------------- driver side


def ray_stream_merge(
    writer: StreamingCheckpointWriter,
    targets: Sequence[Tuple[str, OutputTensor]],
    *,
    options: MergeOptions,
    settings: RaySettings,
    budget: int,
) -> RayRunStats:
    """Run the pending ``targets`` as Ray jobs and write every pending entry of ``writer`` in order.

    ``budget``: each worker's memory budget (the plan the targets carry), reserved per job as
    Ray's ``memory`` resource, so no node runs more jobs than its memory holds.
    """
    ray = require_ray()
    done = set(writer.completed_names())
    pending = {name: task for name, task in targets if name not in done}
    jobs = plan_jobs(writer.pending_names(), pending, writer.entries)
    threads = max(1, options.num_threads or 1)
    device = str(options.device or "cpu")
    gpus = 1 if device.startswith("cuda") else 0
    started = time.monotonic()
    with _connected(ray, settings, threads, quiet=options.quiet):
        connected = time.monotonic() - started
        cluster = ray.cluster_resources()
        _check_fits(ray, budget, threads, gpus)
        available = max(1, int(cluster.get("CPU", 1)) // threads)
        workers = settings.workers or available
        if gpus:
            workers = min(workers, max(1, int(cluster.get("GPU", 1))))
        # Two jobs per worker keep every worker busy while the driver writes; only where the
        # cluster itself runs at most ``workers`` at once (else the cap is the limit).
        in_flight = 2 * workers if available <= workers else workers
        store = int(cluster.get("object_store_memory", 0))
        window = min(settings.window_bytes, store // 2) if store else settings.window_bytes
        setup = _WorkerSetup(
            merge_id=uuid.uuid4().hex,
            options=options,
            device=device,
            cwd=os.getcwd(),
            threads=threads,
            inputs=_input_digests(),
            versions=_versions(),
        )
        task = ray.remote(_merge_job).options(
            num_cpus=threads, num_gpus=gpus, memory=budget, max_retries=settings.max_retries, retry_exceptions=False
        )
        LOG.info("Ray merge: %d jobs on %d workers, window %.0f MB", len(jobs), workers, window / 1e6)
        run = _Run(ray, task, ray.put(setup), jobs, writer, window, in_flight, settings.max_retries)
        total = sum(job.cost for job in jobs)
        with tqdm(total=total, unit="B", unit_scale=True, desc="merging (ray)", disable=options.quiet) as bar:
            run.execute(bar)
        seconds = time.monotonic() - started
    first = (run.first_result - started) if run.first_result is not None else seconds
    # One line a benchmark reads (bench/bench_ray.py): where a small merge's time goes.
    LOG.info("ray: connect %.2f s, first result %.2f s, merge %.2f s", connected, first, seconds)
    return RayRunStats(
        jobs=len(jobs),
        workers=workers,
        bytes_read=run.bytes_read,
        max_unwritten_bytes=run.max_unwritten,
        window_bytes=window,
        connect_seconds=connected,
        first_result_seconds=first,
        seconds=seconds,
    )


def _input_digests() -> Tuple[Tuple[str, str], ...]:
    paths = sorted(
        {loader.index.file_path for loader in LoaderCache.loaders.values() if isinstance(loader, SDXLCheckpointLoader)}
    )
    return tuple((path, sample_digest(path)) for path in paths)


@contextmanager
def _connected(ray: ModuleType, settings: RaySettings, threads: int, *, quiet: bool) -> Iterator[None]:
    """Ray connected for the merge: an existing connection is used as it is; otherwise a local
    cluster is started (and stopped after), or the cluster at the address joined (and left)."""
    if ray.is_initialized():
        yield
        return
    quiet_kwargs: Dict[str, Any] = {
        "logging_level": logging.ERROR if quiet else logging.WARNING,
        "log_to_driver": not quiet,
    }
    held = _handlers()
    # What joining a cluster raises for a wrong address or token (AuthenticationError: recent Ray only).
    auth = getattr(ray.exceptions, "AuthenticationError", None)
    refused: Tuple[Type[BaseException], ...] = (ConnectionError, TimeoutError, ValueError) + ((auth,) if auth else ())
    try:
        if settings.local:
            ray.init(
                address=LOCAL,
                num_cpus=local_workers(settings, threads) * threads,
                include_dashboard=False,
                **quiet_kwargs,
            )
        else:
            ray.init(address=settings.address, **quiet_kwargs)
    except refused as error:
        hint = (
            ""
            if settings.local
            else "; a cluster with token authentication needs RAY_AUTH_MODE=token and its token here too"
        )
        raise RayMergeError(
            f"--ray-address {settings.address}: no Ray cluster could be joined there ({_first_line(error)}){hint}"
        ) from error
    finally:
        _restore(held)
    try:
        yield
    finally:
        ray.shutdown()


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _handlers() -> Dict[int, Any]:
    return {signum: signal.getsignal(signum) for signum in _SIGNALS}


_arrived: List[int] = []  # signals whose handler ran while Ray waited (newest last)


def _restore(held: Mapping[int, Any]) -> None:
    """Ray installs its own SIGTERM handler (it aborts the process with a stack dump): the
    caller's are put back, so SIGTERM and Ctrl-C keep the partial output resumable and exit
    with their codes (143, 130). Each notes its signal: inside ``ray.wait``/``ray.get`` Ray
    turns whatever a handler raises into a plain ``KeyboardInterrupt`` (see :func:`_ray_call`)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in held.items():
        if callable(handler):
            signal.signal(signum, _noting(signum, handler))
        elif handler is not None:
            signal.signal(signum, handler)


def _noting(signum: int, handler: Any) -> Any:
    def noted(number: int, frame: Any) -> Any:
        _arrived.append(number)
        return handler(number, frame)

    return noted


def _ray_call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``; a ``KeyboardInterrupt`` Ray made of a signal handler's
    exception becomes that exception again (the handler is run once more to raise it)."""
    _arrived.clear()
    try:
        return function(*args, **kwargs)
    except KeyboardInterrupt as error:
        if not _arrived:
            raise
        signum = _arrived[-1]
        handler = signal.getsignal(signum)
        try:
            if callable(handler):
                handler(signum, None)
        except BaseException as raised:  # noqa: BLE001 - exactly what the handler raises
            raise raised from error
        raise


def _check_fits(ray: ModuleType, budget: int, threads: int, gpus: int) -> None:
    """A job no node can run would wait forever: refuse it with the option to change."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    memory = max((float(r.get("memory", 0)) for r in nodes), default=0.0)
    if budget > memory:
        raise RayMergeError(
            f"--memory-budget {budget / 2**20:.0f}MiB: no node of the Ray cluster has that much memory for a worker "
            f"(largest: {memory / 2**20:.0f}MiB); give a smaller --memory-budget"
        )
    if threads > max((float(r.get("CPU", 0)) for r in nodes), default=0.0):
        raise RayMergeError(f"--threads {threads}: no node of the Ray cluster has that many CPUs")
    if gpus and not any(float(r.get("GPU", 0)) >= gpus for r in nodes):
        raise RayMergeError("--cuda: no node of the Ray cluster has a GPU")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _Run:
    """The driver's loop: submit the jobs inside the window, largest first; write finished jobs
    in output order; free each job's object once written."""

    def __init__(
        self,
        ray: ModuleType,
        task: Any,
        setup: Any,
        jobs: Sequence[_Job],
        writer: StreamingCheckpointWriter,
        window: int,
        in_flight: int,
        max_retries: int,
    ) -> None:
        self._ray, self._task, self._setup, self._jobs, self._writer = ray, task, setup, jobs, writer
        self._window, self._in_flight, self._max_retries = window, in_flight, max_retries
        self._ends = [0]  # output bytes of jobs [0, i)
        for job in jobs:
            self._ends.append(self._ends[-1] + job.out_bytes)
        self._refs: Dict[int, Any] = {}  # submitted, not yet written
        self._running: Dict[Any, int] = {}  # submitted, not known finished
        self._queue: List[Tuple[int, int]] = []  # (-cost, index) of jobs in the window, not submitted
        self._entered = 0  # jobs [0, entered) have been let into the window
        self.bytes_read = 0
        self.max_unwritten = 0
        self.first_result: Optional[float] = None  # time.monotonic() of the first finished job

    def execute(self, bar: Any) -> None:
        head = 0
        written, keys = 0, sum(len(job.names) for job in self._jobs)
        while head < len(self._jobs):
            self._submit(head)
            job = self._jobs[head]
            if job.targets and not self._finished(head):
                self._wait()
                continue
            self._write(job)
            written += len(job.names)
            head += 1
            bar.update(job.cost)
            bar.set_postfix_str(f"keys {written}/{keys} {job.names[-1][-40:]}", refresh=False)

    def _finished(self, index: int) -> bool:
        ref = self._refs.get(index)
        return ref is not None and ref not in self._running

    def _submit(self, head: int) -> None:
        limit = max(head + 1, bisect_right(self._ends, self._ends[head] + self._window) - 1)
        while self._entered < min(limit, len(self._jobs)):
            job = self._jobs[self._entered]
            if job.targets:
                heapq.heappush(self._queue, (-job.cost, job.index))
            self._entered += 1
        while self._queue and len(self._running) < self._in_flight:
            _, index = heapq.heappop(self._queue)
            ref = self._task.remote(self._setup, self._jobs[index].targets)
            self._refs[index] = ref
            self._running[ref] = index
        unwritten = self._ends[max(self._refs) + 1] - self._ends[head] if self._refs else 0
        self.max_unwritten = max(self.max_unwritten, unwritten)

    def _wait(self) -> None:
        ready, _ = _ray_call(self._ray.wait, list(self._running), num_returns=1, fetch_local=False)
        if ready and self.first_result is None:
            self.first_result = time.monotonic()
        for ref in ready:
            self._running.pop(ref, None)

    def _write(self, job: _Job) -> None:
        if not job.targets:
            for name in job.names:
                self._writer.write(name, torch.empty(0, dtype=torch.float32))
            return
        ref = self._refs.pop(job.index)
        values, read = self._get(ref, job)
        del ref  # the object store frees the job's tensors once the driver holds no reference
        self.bytes_read += read
        for name, value in zip(job.names, values, strict=True):
            if value is None:
                raise RayMergeError(f"the merge produced no value for {name}")
            self._writer.write(name, _from_wire(value))

    def _get(self, ref: Any, job: _Job) -> Tuple[List[Optional[_Wire]], int]:
        exceptions = self._ray.exceptions
        try:
            return _ray_call(self._ray.get, ref)
        except exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, UserError):
                raise cause from None  # the worker's one-line message (a bad input, a NaN key)
            raise
        except exceptions.OutOfMemoryError as error:
            raise RayMergeError(
                f"{job.names[0]}: Ray stopped its worker for lack of memory ({_first_line(error)}); "
                "give a smaller --memory-budget and run the same command again to resume"
            ) from error
        except exceptions.RayError as error:
            raise RayMergeError(
                f"{job.names[0]}: its Ray worker was lost {self._max_retries + 1} times ({type(error).__name__}: "
                f"{_first_line(error)}); run the same command again to resume"
            ) from error
