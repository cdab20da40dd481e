"""`batch --ray`: the jobs on a Ray runtime, one actor per GPU (or per N CPU threads) holding a model
session. Imported only with --ray (Ray is optional).

Ray does the plumbing: `ray.util.ActorPool` hands each job to the next free worker; a worker process
that dies (a crash, an OOM kill, a lost node) is restarted by Ray (`max_restarts`), which runs the job it
had again on it (`max_task_retries`). The driver keeps only the report: it sees a retry as a change of the
worker's process (each worker is named name@host:pid) and records the failed attempt. Workers ask for
resources that fit the nodes there are: a request that no node can satisfy is refused with one line
before anything starts.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util import ActorPool

import emocast_lib

from .batch import Ledger, Task, Worker, describe_error, worker_name
from .jobs import ModelSettings

LOCAL_OBJECT_STORE = 256 * 1024**2  # jobs and results are a few kB: the frames go to disk on the worker
DEFAULT_THREADS = 4  # CPU threads of a CPU worker, at most the CPUs of the largest node
MAX_RESTARTS = 2  # per worker process; each job is run again once after its worker died


class RayStartError(RuntimeError):
    """Ray could not start a local runtime, join the cluster, or place a worker on any node."""


class RayWorker:
    """The body of a Ray actor. The actor is threaded, so `status` and `stop` are answered while `run` works."""

    def __init__(self, name: str, settings: ModelSettings, identity: bool, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.worker = Worker(worker_name(name), settings, identity)

    def ready(self) -> str:
        return self.worker.name

    def run(self, task: Task) -> dict[str, Any]:
        return self.worker.run(task)

    def status(self) -> tuple[str, float]:
        return self.worker.name, self.worker.progress

    def stop(self) -> None:
        self.worker.stop.set()


@dataclass(frozen=True)
class Fit:
    """How many workers, and what each asks of a node."""

    count: int
    resources: dict[str, int]
    threads: int | None  # torch threads of a CPU worker
    device: str
    text: str


def fit(nodes: list[dict], device: str, workers: int | None, threads: int | None, jobs: int) -> Fit:
    """Workers that the nodes (ray.nodes()) can hold: one GPU each where there are GPUs, else `threads`
    CPUs each (default: DEFAULT_THREADS, or the CPUs of the largest node if fewer)."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    gpus = sum(int(r.get("GPU", 0)) for r in alive) if device in ("auto", "cuda") else 0
    if gpus:
        return Fit(min(workers or gpus, jobs), {"num_gpus": 1, "num_cpus": 1}, None, "cuda", "one GPU")
    largest = max((int(r.get("CPU", 0)) for r in alive), default=0)
    threads = threads or min(DEFAULT_THREADS, largest)
    if not 1 <= threads <= largest:
        raise RayStartError(f"--threads {threads}: no Ray node has that many CPUs (the largest has {largest}); use "
                            f"--threads {largest} or fewer" if largest else "--ray: no Ray node offers a CPU")
    total = sum(int(r.get("CPU", 0)) for r in alive)
    return Fit(min(workers or max(1, total // threads), jobs), {"num_cpus": threads}, threads, "cpu",
               f"{threads} CPU thread(s)")


def run_ray(ledger: Ledger, tasks: list[Task], settings: ModelSettings, identity: bool, stop: threading.Event,
            address: str | None, workers: int | None, threads: int | None, dashboard: bool) -> None:
    """The jobs on Ray: a new local runtime when `address` is None, else the cluster at `address`. The
    pack's library travels to the workers; paths (models, inputs, outputs) must be the same on every node."""
    # The library travels with the job (same code on every node); workers' prints stay in Ray's logs
    # (dashboard), so the driver shows only the progress line.
    options = {"runtime_env": {"py_modules": [str(Path(emocast_lib.__file__).parent)], "excludes": ["__pycache__"]},
               "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address is None:
            ray.init(address="local", num_cpus=workers * threads if workers and threads else None,
                     include_dashboard=dashboard, object_store_memory=LOCAL_OBJECT_STORE, **options)
        else:
            ray.init(address=address, **options)
    except Exception as e:  # a wrong address, a version mismatch, no room for the runtime
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        raise RayStartError(f"--ray: could not start or join {where}: {describe_error(e)}") from e
    try:
        plan = fit(ray.nodes(), settings.device, workers, threads, len(tasks))
        _Driver(ledger, tasks, settings.model_copy(update={"device": plan.device}), identity, stop, plan).drive()
    finally:
        ray.shutdown()


class _Driver:
    """Starts the workers, feeds the pool and turns what comes back into the ledger's entries."""

    def __init__(self, ledger: Ledger, tasks: list[Task], settings: ModelSettings, identity: bool,
                 stop: threading.Event, plan: Fit):
        self.ledger, self.stop, self.left, self.trouble = ledger, stop, len(tasks), ""
        actor = ray.remote(RayWorker).options(max_concurrency=2, max_restarts=MAX_RESTARTS, max_task_retries=1,
                                              **plan.resources)
        self.actors = [actor.remote(f"w{i}", settings, identity, plan.threads) for i in range(plan.count)]
        self.loading = {a.ready.remote(): a for a in self.actors}
        self.names: dict[Any, str] = {}  # actor -> its worker's name (name@host:pid of its current process)
        self.running: dict[int, Any] = {}  # task index -> actor
        self.inflight: dict[Any, Task] = {}  # result ref -> task
        self.started: list[int] = []  # tasks the pool has just handed out, for the ledger
        self.pool = ActorPool([])
        ledger.workers = plan.count
        ledger.say(f"ray: {plan.count} worker(s) on {plan.text} each, cluster at "
                   f"{ray.get_runtime_context().gcs_address}")
        for task in tasks:
            self.pool.submit(self._dispatch, task)

    def _dispatch(self, actor, task: Task):
        """Called by the pool when `actor` is free for `task`: start it, unless the batch is stopping."""
        if self.stop.is_set():
            return ray.put({"index": task.index, "skipped": True})
        self.running[task.index] = actor
        self.started.append(task.index)  # recorded once the pool call that handed it out has returned
        ref = actor.run.remote(task)
        self.inflight[ref] = task
        return ref

    def drive(self) -> None:
        try:
            while self.left:
                self._admit()
                if self.stop.is_set():
                    for actor in self.running.values():
                        actor.stop.remote()
                if not self.pool.has_next():
                    if not self.loading:
                        break  # no worker left
                    ray.wait(list(self.loading), num_returns=1, timeout=1.0)
                    continue
                self._next()
                self._record_starts()
        finally:  # a worker still loading its models would outlive the runtime by a minute
            for actor in self.actors:
                ray.kill(actor)
        for entry in self.ledger.entries:
            if entry.status == "pending" and not self.stop.is_set():
                entry.status, entry.error = "failed", f"not run: no worker left ({self.trouble})"
        self.ledger.write_report()

    def _record_starts(self) -> None:
        for index in self.started:
            self.ledger.start(self.ledger.entries[index], self.names[self.running[index]])
        self.started.clear()

    def _admit(self) -> None:
        """Workers whose models have loaded join the pool; one that failed to start says why."""
        ready, _ = ray.wait(list(self.loading), num_returns=len(self.loading), timeout=0)
        for ref in ready:
            actor = self.loading.pop(ref)
            try:
                self.names[actor] = ray.get(ref)
            except ray.exceptions.RayError as e:  # its models did not load
                self.trouble = f"a worker did not start: {describe_error(e)}"
                self.ledger.say(f"ray: {self.trouble}")
                continue
            self.pool.push(actor)
        self._record_starts()

    def _next(self) -> None:
        try:
            result = self.pool.get_next_unordered(timeout=1.0)
        except TimeoutError:
            self._poll()
            return
        except ray.exceptions.RayActorError as e:  # died again while running the job a second time
            task = self._failed()
            self._end(task.index, "failed", f"worker {self.ledger.entries[task.index].worker} died "
                                            f"({type(e).__name__})", None)
            return
        if result.get("skipped"):
            self.left -= 1
            return
        self._end(result["index"], result["status"], result["error"], result["worker"])

    def _failed(self) -> Task:
        """The task whose result is an error (the pool raised it without saying which)."""
        ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayError:
                return self.inflight[ref]
        raise RuntimeError("the pool reported a failed job that is not running")  # Ray broke its contract

    def _end(self, index: int, status: str, error: str | None, worker: str | None) -> None:
        entry, actor = self.ledger.entries[index], self.running.pop(index)
        self.inflight = {ref: t for ref, t in self.inflight.items() if t.index != index}
        if worker is not None:
            self._moved(entry, actor, worker)
        self.ledger.finish(entry, status, error)
        self.left -= 1

    def _moved(self, entry, actor, worker: str) -> None:
        """The job's worker process is now `worker`: if that is not the one it started on, that one died
        and Ray ran the job again on the restarted worker."""
        self.names[actor] = worker
        if entry.worker != worker:
            self.ledger.finish(entry, "failed", f"worker {entry.worker} died", retry=True)
            entry.worker = worker

    def _poll(self) -> None:
        """Each running job's progress (for the ETA), and a worker restarted under it."""
        asked = {index: actor.status.remote() for index, actor in self.running.items()}
        for index, answer in asked.items():
            try:
                worker, progress = ray.get(answer, timeout=1.0)
            except ray.exceptions.RayError:
                continue
            entry = self.ledger.entries[index]
            if index in self.running:
                self._moved(entry, self.running[index], worker)
                entry.progress = progress
        self.ledger.draw()
