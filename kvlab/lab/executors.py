"""Executors: where the cells of a sweep run. Each yields finished rows; the driver writes them.

* :class:`LocalExecutor` runs the cells in this process, one model group after another.
* :class:`RayExecutor` runs them as Ray actor tasks: per model, a few actors (``num_gpus`` each, set by
  ``--gpus-per-cell``) load the model once and take cells until none are left. It starts a local Ray
  on demand (``ray.init(num_cpus=..., include_dashboard=False)``) or joins a cluster (``--ray-address``).
  Ray is the optional extra ``pip install kvlab[ray]``.

A group is ``(model, device, dtype, cells)``; rows come back in completion order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from kvlab.errors import KvlabError
from kvlab.lab.config import Cell
from kvlab.lab.worker import CellWorker, WorkerSpec
from kvlab.results import make_row

Group = tuple[str, str, str, list[Cell]]


class Executor(Protocol):
    def run(self, groups: list[Group], spec: WorkerSpec) -> Iterator[dict[str, Any]]: ...


class LocalExecutor:
    """Runs every cell in this process; one model in memory at a time."""

    def run(self, groups: list[Group], spec: WorkerSpec) -> Iterator[dict[str, Any]]:
        for model, device, dtype, cells in groups:
            worker = CellWorker(model, device, dtype, spec)
            try:
                for cell in cells:
                    yield worker.run(cell)
            finally:
                worker.close()


def import_ray() -> Any:
    """The ``ray`` module, or a one-line KvlabError naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise KvlabError("--executor ray needs Ray: pip install 'kvlab[ray]'") from exc
    return ray


class _RayCellWorker:
    """The Ray actor: a CellWorker in a Ray worker process, kept across models (imports happen once);
    it loads a model on its first cell and swaps it when cells of the next model arrive."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.key: tuple[str, str, str] | None = None
        self.worker: CellWorker | None = None

    def run(self, key: tuple[str, str, str], cell: Cell) -> dict[str, Any]:
        if key != self.key or self.worker is None:
            if self.worker is not None:
                self.worker.close()
            self.worker, self.key = CellWorker(*key, self.spec), key
        return self.worker.run(cell)


@dataclass
class RayExecutor:
    """Cells as Ray actor tasks. ``workers``: actors per model (default: as many as resources allow)."""

    address: str | None = None
    gpus_per_cell: float = 0.0
    cpus_per_cell: float = 1.0
    num_cpus: int | None = None  # for a local Ray started here (default: all cores)
    workers: int | None = None
    max_restarts: int = 1  # a dead actor (e.g. out of memory) is replaced this many times per model

    def __post_init__(self) -> None:
        if self.gpus_per_cell < 0 or self.cpus_per_cell <= 0:
            raise KvlabError("--gpus-per-cell must be >= 0 and --cpus-per-cell > 0")
        if self.workers is not None and self.workers < 1:
            raise KvlabError("--workers must be >= 1")

    def _connect(self, ray: Any) -> bool:
        """Connect to Ray; return True when this call started it (so it also shuts it down)."""
        if ray.is_initialized():
            return False
        if self.address:  # every node of a cluster has kvlab (and the evaluations) installed
            try:
                ray.init(address=self.address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise KvlabError(f"cannot reach the Ray cluster at '{self.address}': {exc}") from exc
        else:  # a local Ray: its workers import what this process imports
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(_driver_path())}}
            ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     runtime_env=env, log_to_driver=False)
        return True

    def _n_actors(self, ray: Any, n_cells: int) -> int:
        if self.workers:
            return min(self.workers, n_cells)
        resources = ray.cluster_resources()
        fit = resources.get("CPU", 1) / self.cpus_per_cell  # every actor must fit, or cells wait forever
        if self.gpus_per_cell > 0:
            gpus = resources.get("GPU", 0)
            if gpus < self.gpus_per_cell:
                raise KvlabError(f"--gpus-per-cell {self.gpus_per_cell:g} but the Ray cluster has {gpus:g} GPU(s); "
                                 "use --gpus-per-cell 0 to run on CPUs")
            fit = min(fit, gpus / self.gpus_per_cell)
        return max(1, min(n_cells, math.floor(fit)))

    def run(self, groups: list[Group], spec: WorkerSpec) -> Iterator[dict[str, Any]]:
        ray = import_ray()
        started = self._connect(ray)
        actors: list[Any] = []
        try:
            actor_cls = ray.remote(num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell)(_RayCellWorker)
            n_actors = self._n_actors(ray, max((len(g[3]) for g in groups), default=1))
            actors = [actor_cls.remote(spec) for _ in range(n_actors)]
            for model, device, dtype, cells in groups:
                yield from self._run_group(ray, actors, lambda: actor_cls.remote(spec), (model, device, dtype), cells)
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()

    def _run_group(self, ray: Any, actors: list[Any], new_actor: Any, key: tuple[str, str, str],
                   cells: list[Cell]) -> Iterator[dict[str, Any]]:
        """Feed one model's cells to the actors, one cell in flight per actor; a dead actor is replaced
        (up to ``max_restarts`` times) in ``actors`` itself."""
        todo = list(reversed(cells))
        idle = list(actors[: len(cells)])
        flight: dict[Any, tuple[Cell, Any]] = {}
        restarts = 0
        while todo or flight:
            while todo and idle:
                actor, cell = idle.pop(), todo.pop()
                flight[actor.run.remote(key, cell)] = (cell, actor)
            if not flight:  # every actor died and no restart is left
                for cell in reversed(todo):
                    yield _failed(cell, "no Ray worker left for this model (workers died); rerun to retry")
                return
            done, _ = ray.wait(list(flight), num_returns=1)
            cell, actor = flight.pop(done[0])
            try:
                yield ray.get(done[0])
                idle.append(actor)
            except ray.exceptions.RayActorError as exc:
                yield _failed(cell, f"Ray worker died: {str(exc).strip().splitlines()[0]}")
                actors.remove(actor)
                if restarts < self.max_restarts:
                    restarts += 1
                    actors.append(new_actor())
                    idle.append(actors[-1])
            except ray.exceptions.RayError as exc:
                yield _failed(cell, f"Ray task failed: {str(exc).strip().splitlines()[0]}")
                idle.append(actor)


def _failed(cell: Cell, error: str) -> dict[str, Any]:
    return make_row(cell.eval, cell.config(), error=error, row_id=cell.id)


def _driver_path() -> list[str]:
    """The driver's import path, so that Ray workers on this machine import the same modules."""
    import sys

    return [p for p in sys.path if p and os.path.isdir(p)]


def make_executor(name: str, *, address: str | None = None, gpus_per_cell: float = 0.0,
                  cpus_per_cell: float | None = None, workers: int | None = None) -> Executor:
    """``local`` or ``ray`` (KvlabError otherwise)."""
    if name == "local":
        if address or gpus_per_cell or cpus_per_cell or workers:
            raise KvlabError("--ray-address, --gpus-per-cell, --cpus-per-cell and --workers need --executor ray")
        return LocalExecutor()
    if name == "ray":
        import_ray()
        return RayExecutor(address=address, gpus_per_cell=gpus_per_cell, cpus_per_cell=cpus_per_cell or 1.0,
                           workers=workers)
    raise KvlabError(f"unknown executor '{name}'; choose from: local, ray")
