"""Where stage 3 runs: in this process, on a pool of local worker processes, or on Ray actors.

A runner takes :class:`~segany.engine.auto.ImageTask` s and yields
:class:`~segany.engine.auto.ImageResult` s as they finish (any order). Runners never touch the store:
the driver writes each result idempotently, so a runner may deliver a result twice (a task retried
after its worker died) without harm, and must never lose one.

Making a runner loads no model: it decides where the workers run and so ``runner.spec``, the device and
precision every worker gets (``auto`` decided once, on the driver: :func:`~segany.engine.auto.decide_precision`),
which the driver records before any work starts. ``start()`` then builds the workers; ``close()`` ends them.

* ``InlineRunner``: one model in the calling process (``--workers 1``).
* ``PoolRunner``: N spawned processes, each holding one model replica and using cores/N threads.
* ``RayRunner``: N Ray actors, one model replica each (one per GPU when the cluster has GPUs, else
  one per CPU). The checkpoint is put in Ray's object store once and images travel as file bytes, so
  actors on other machines need no shared file system. A task whose actor dies is resubmitted to a
  fresh actor; results stream back through ``ray.wait``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from segany.engine.auto import AutoSettings, AutoWorker, ImageResult, ImageTask, ModelSpec, decide_precision
from segany.errors import InputError, SeganyError

log = logging.getLogger(__name__)


class JobError(SeganyError):
    """A distributed job could not finish (workers keep dying, the cluster is unreachable)."""


class InlineRunner:
    def __init__(self, spec: ModelSpec, settings: AutoSettings, *, threads: int | None = None) -> None:
        self.workers = 1
        self.spec = decide_precision(spec)
        self._settings, self._threads = settings, threads
        self.worker: AutoWorker | None = None

    def start(self) -> None:
        if self.worker is None:
            self.worker = AutoWorker(self.spec, self._settings, threads=self._threads)

    def run(self, tasks: Sequence[ImageTask]) -> Iterator[ImageResult]:
        self.start()
        assert self.worker is not None  # for mypy: start() built it
        for t in tasks:
            yield self.worker.process(t)

    def close(self) -> None:
        pass


# One replica per pool process, built by the initializer; or why it could not be built.
_POOL_WORKER: AutoWorker | None = None
_POOL_INIT_ERROR: str | None = None


def _pool_init(spec: ModelSpec, settings: AutoSettings, threads: int) -> None:
    """Build this process's replica, on ``threads`` torch threads. A failure is kept, not raised: a pool whose
    initializer raises is broken (or, for ``multiprocessing.Pool``, restarted forever), and the driver would
    learn only that a process died. The first task reports it instead, with the reason."""
    global _POOL_WORKER, _POOL_INIT_ERROR
    try:
        _POOL_WORKER = AutoWorker(spec, settings, threads=threads)
    except Exception as exc:  # noqa: BLE001 - reported, with its type, by the first task
        _POOL_INIT_ERROR = f"{type(exc).__name__}: {exc}"


def _pool_process(task: ImageTask) -> ImageResult:
    if _POOL_WORKER is None:
        raise JobError(f"a worker process could not load the model ({_POOL_INIT_ERROR or 'no initializer ran'})")
    return _POOL_WORKER.process(task)


POOL_MAX_ATTEMPTS = 3  # times an image may kill its worker alone before it is left to do


class PoolRunner:
    """A ``spawn`` process pool (fork would copy the parent's torch thread pools and can deadlock).

    ``concurrent.futures`` rather than ``multiprocessing.Pool``: when a worker dies (killed for memory, a
    crash in native code) the latter silently loses its task and ``imap`` waits forever, while an executor
    reports the pool broken. The tasks then unfinished go to a fresh pool (see :meth:`run`).
    """

    def __init__(self, spec: ModelSpec, settings: AutoSettings, workers: int, *,
                 max_attempts: int | None = None, threads: int | None = None) -> None:
        self.workers = workers
        self.max_attempts = POOL_MAX_ATTEMPTS if max_attempts is None else max_attempts
        self.restarts = 0
        self.spec = decide_precision(spec)
        # Each process's torch threads: ``threads`` as asked, else the cores shared out between the processes.
        self._args = (self.spec, settings,
                      threads if threads is not None else max(1, (os.cpu_count() or 1) // workers))
        self.pool: Any = None

    def start(self) -> None:
        if self.pool is None:
            self.pool = self._new_pool()

    def _new_pool(self) -> Any:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_pool_init,
                                   initargs=self._args)

    def worker_pids(self) -> list[int]:
        """The live worker processes (tests kill one); empty before the pool has started any."""
        return [p.pid for p in (getattr(self.pool, "_processes", None) or {}).values() if p.is_alive()]

    def run(self, tasks: Sequence[ImageTask]) -> Iterator[ImageResult]:
        """Yield every task's result. A dead worker breaks the whole pool and fails every task in flight with
        it, without saying whose task killed it; those tasks become suspects and run again one at a time on a
        new pool, where a death names its image. Such an image is tried ``max_attempts`` times alone, then
        comes back as a failed result (it stays to do, like an unreadable image) while the run goes on."""
        from concurrent.futures import FIRST_COMPLETED, Future, wait
        from concurrent.futures.process import BrokenProcessPool

        self.start()
        queue: collections.deque[ImageTask] = collections.deque(tasks)
        suspects: collections.deque[tuple[ImageTask, int]] = collections.deque()  # (task, deaths alone)
        inflight: dict[Future[ImageResult], tuple[ImageTask, int]] = {}
        while queue or suspects or inflight:
            if suspects:  # alone, so that a death is its own
                if not inflight:
                    task, deaths = suspects.popleft()
                    inflight[self.pool.submit(_pool_process, task)] = (task, deaths)
            else:  # at most two per worker: a death fails only these, not everything queued behind them
                while queue and len(inflight) < 2 * self.workers:
                    task = queue.popleft()
                    inflight[self.pool.submit(_pool_process, task)] = (task, 0)
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            lost: list[tuple[ImageTask, int]] = []
            for fut in done:
                task, deaths = inflight.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    lost.append((task, deaths))
                    continue
                yield result  # results that finished before the death still count
            if not lost:
                continue
            lost += list(inflight.values())  # the pool is broken: the rest fail with it
            inflight.clear()
            alone = len(lost) == 1
            for task, deaths in lost:
                deaths += alone
                if deaths >= self.max_attempts:
                    log.warning("image %d killed its worker process %d times; left to do", task.image_id, deaths)
                    yield ImageResult(task.image_id, task.sha256, [], 0.0, error=(
                        f"its worker process died each of {deaths} times it ran alone (out of memory? see "
                        "dmesg); it stays to do: rerun with fewer --workers, or remove the image"))
                else:
                    suspects.append((task, deaths))
            log.warning("a worker process died; running %d suspect images one at a time on a new pool",
                        len(suspects))
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = self._new_pool()
            self.restarts += 1

    def close(self) -> None:
        if self.pool is None:  # never started
            return
        for pid in self.worker_pids():  # do not wait for a long image: the driver is stopping
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self.pool.shutdown(wait=True, cancel_futures=True)


class _RayWorkerImpl:
    """Body of the Ray actor (wrapped with ``ray.remote`` at run time, so importing needs no Ray)."""

    def __init__(self, spec: ModelSpec, settings: AutoSettings, threads: int | None) -> None:
        self.worker = AutoWorker(spec, settings, threads=threads)

    def pid(self) -> int:
        return os.getpid()

    def process(self, task: ImageTask) -> ImageResult:
        return self.worker.process(task)


def ray_device(requested: str, cluster_gpus: int) -> str:
    """The device of every Ray actor: ``cuda`` (one GPU each) or ``cpu``, from the cluster's resources.

    Why from the cluster and not the driver's machine: the machine that starts ``engine auto --ray ADDRESS``
    may have no GPU while the cluster has many; ``auto`` resolved there would leave them idle, and ``cuda``
    would be refused.
    """
    if requested not in ("auto", "cpu", "cuda"):
        why = "Ray gives each actor a whole GPU of its own"
        raise InputError(f"device={requested!r} with backend='ray': {why}; pass device='cuda', 'cpu' or 'auto'",
                         cli=f"--device {requested} with --ray: {why}; pass --device cuda, cpu or auto")
    if requested == "cuda" and cluster_gpus == 0:
        raise InputError("device='cuda', but the Ray cluster has no GPU; pass device='cpu' or 'auto'",
                         cli="--device cuda, but the Ray cluster has no GPU; pass --device cpu or auto")
    return "cuda" if cluster_gpus > 0 and requested != "cpu" else "cpu"


class RayRunner:
    def __init__(self, spec: ModelSpec, settings: AutoSettings, *, workers: int = 0, address: str | None = None,
                 max_attempts: int = 3, inflight_per_worker: int = 2, threads: int | None = None) -> None:
        from segany.errors import require

        require("ray", "scale")
        import ray

        self.ray = ray
        self._started_ray = False
        self.actors: list[Any] = []
        if not ray.is_initialized():
            if address in (None, "local"):
                ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        try:
            device = ray_device(spec.device, gpus)
            # CPU actors take ``auto`` as the driver's CPU decides it (one precision for the whole run).
            self.spec = decide_precision(dataclasses.replace(spec, device=device))
        except BaseException:  # refused (no GPU for --device cuda, fp16 on CPU): leave no Ray behind
            self.close()
            raise
        use_gpu = device == "cuda"
        self.workers = workers or (gpus if use_gpu else max(1, cpus))
        if threads is None and not use_gpu:
            threads = max(1, cpus // self.workers)
        self._actor_cls = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                                     max_restarts=0)(_RayWorkerImpl)
        self._settings, self._threads = settings, threads
        self._args: tuple[Any, ...] | None = None
        self.max_attempts = max_attempts
        self.inflight_per_worker = inflight_per_worker
        self.restarts = 0

    def start(self) -> None:
        """Put the weights in the object store (not a path the actors may lack) and start the actors."""
        if self._args is not None:
            return
        spec = self.spec
        if spec.checkpoint and spec.checkpoint_bytes is None:
            with open(spec.checkpoint, "rb") as f:
                spec = dataclasses.replace(spec, checkpoint_bytes=f.read())
        self._args = (self.ray.put(spec), self._settings, self._threads)
        self.actors = [self._new_actor() for _ in range(self.workers)]

    def _new_actor(self) -> Any:
        assert self._args is not None  # for mypy: start() set them
        spec_ref, settings, threads = self._args
        return self._actor_cls.remote(spec_ref, settings, threads)

    def actor_pids(self) -> list[int]:
        return [int(p) for p in self.ray.get([a.pid.remote() for a in self.actors])]

    def run(self, tasks: Sequence[ImageTask]) -> Iterator[ImageResult]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

        lost = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
        self.start()
        queue: collections.deque[tuple[ImageTask, int]] = collections.deque((t, 1) for t in tasks)
        inflight: dict[Any, tuple[int, Any, ImageTask, int]] = {}  # ref -> (slot, actor, task, attempt)
        load = [0] * len(self.actors)
        while queue or inflight:
            for slot in range(len(self.actors)):
                while queue and load[slot] < self.inflight_per_worker:
                    task, attempt = queue.popleft()
                    actor = self.actors[slot]
                    inflight[actor.process.remote(task)] = (slot, actor, task, attempt)
                    load[slot] += 1
            ready, _ = self.ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                slot, actor, task, attempt = inflight.pop(ref)
                load[slot] -= 1
                try:
                    result = self.ray.get(ref)
                except lost as exc:
                    if attempt >= self.max_attempts:
                        raise JobError(f"image {task.image_id} failed {attempt} times because its worker died "
                                       f"({type(exc).__name__}); check the workers' memory and logs") from exc
                    log.warning("worker for image %d died (%s); retrying on a new worker", task.image_id,
                                type(exc).__name__)
                    if self.actors[slot] is actor:  # its other in-flight tasks fail too: replace once
                        self.actors[slot] = self._new_actor()
                        self.restarts += 1
                    queue.appendleft((task, attempt + 1))
                    continue
                yield result

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # already dead
                pass
        if self._started_ray:
            self.ray.shutdown()


def check_workers(backend: str, workers: int) -> None:
    """Refuse a bad backend or worker count before anything starts (no banner, bar or model load first)."""
    if backend not in ("local", "ray"):
        raise InputError(f"backend must be 'local' or 'ray', got {backend!r}")
    if backend == "ray" and workers < 0:
        why = f"(0: one actor per GPU, else per CPU), got {workers}"
        raise InputError(f"workers must be >= 0 with backend='ray' {why}", cli=f"--workers must be >= 0 with --ray {why}")
    if backend == "local" and workers < 1:
        raise InputError(f"workers must be >= 1 on one machine, got {workers}",
                         cli=f"--workers must be >= 1 on one machine, got {workers}")


def make_runner(backend: str, spec: ModelSpec, settings: AutoSettings, *, workers: int = 1,
                address: str | None = None, threads: int | None = None) -> Any:
    """The runner for ``backend`` (Ray is joined here; no model loads until its ``start()``). ``threads``: each
    worker's torch threads (None: the runner's default)."""
    check_workers(backend, workers)
    if backend == "ray":
        return RayRunner(spec, settings, workers=workers, address=address, threads=threads)
    if workers == 1:
        return InlineRunner(spec, settings, threads=threads)
    return PoolRunner(spec, settings, workers, threads=threads)
