"""The Ray executor: the same rows as the local run, the driver writes them; Ray missing is one clear line."""

from __future__ import annotations

import sys

import pytest

import lab_fakes
from kvlab.errors import KvlabError
from kvlab.lab.config import parse_config
from kvlab.lab.executors import RayExecutor, make_executor
from kvlab.lab.runner import run
from kvlab.lab.store import load_rows

RAW = {"name": "r", "models": ["smollm2-135m", "qwen2.5-0.5b"], "methods": ["full", "streaming:sinks=4,window=60"],
       "evals": {"fake": {"tokens": [128, 256]}}}
TIMINGS = {"runtime_s", "tokens_per_s"}


@pytest.fixture(autouse=True)
def fake_eval():
    with lab_fakes.registered():
        yield


def test_ray_rows_equal_local_rows(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is the optional extra kvlab[ray]")
    monkeypatch.setenv("LAB_FAKES_FAIL", "h2o")  # read inside the Ray workers too
    cfg = parse_config({**RAW, "methods": [*RAW["methods"], "h2o:budget=64,recent=16"]})
    lab_fakes.LOADS.clear()
    executor = RayExecutor(num_cpus=2, workers=1)
    ray_summary = run(cfg, tmp_path / "ray", executor=executor, loader=lab_fakes.load, progress=False,
                      echo=lambda _m: None)
    assert lab_fakes.LOADS == []  # models load in the Ray workers; the driver only writes rows
    local_summary = run(cfg, tmp_path / "local", loader=lab_fakes.load, progress=False, echo=lambda _m: None)
    assert (ray_summary.ok, ray_summary.failed) == (local_summary.ok, local_summary.failed) == (8, 4)
    ray_rows = {r["id"]: r for r in load_rows(tmp_path / "ray")}
    local_rows = {r["id"]: r for r in load_rows(tmp_path / "local")}
    assert ray_rows.keys() == local_rows.keys()
    for cell_id, row in ray_rows.items():
        other = local_rows[cell_id]
        assert (row["status"], row["error"], row["config"]) == (other["status"], other["error"], other["config"])
        assert {k: v for k, v in row["metrics"].items() if k not in TIMINGS} == \
               {k: v for k, v in other["metrics"].items() if k not in TIMINGS}
        assert row["model_info"]["model_type"] == other["model_info"]["model_type"]


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(KvlabError, match=r"pip install 'kvlab\[ray\]'"):
        make_executor("ray")


def test_executor_options_are_checked():
    with pytest.raises(KvlabError, match="need --executor ray"):
        make_executor("local", gpus_per_cell=1)
    with pytest.raises(KvlabError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(KvlabError, match="--gpus-per-cell must be >= 0"):
        RayExecutor(gpus_per_cell=-1)


class FakeCluster:
    def __init__(self, resources: dict) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict:
        return self.resources


def test_as_many_workers_as_the_cluster_holds_at_once():
    assert RayExecutor(gpus_per_cell=1)._n_actors(FakeCluster({"CPU": 4, "GPU": 8}), 100) == 4  # CPUs bind
    assert RayExecutor(gpus_per_cell=0.5)._n_actors(FakeCluster({"CPU": 16, "GPU": 2}), 100) == 4
    assert RayExecutor(cpus_per_cell=2)._n_actors(FakeCluster({"CPU": 8}), 3) == 3  # no more than the cells
    assert RayExecutor(workers=2)._n_actors(FakeCluster({"CPU": 64}), 10) == 2
    with pytest.raises(KvlabError, match="the Ray cluster has 0 GPU"):
        RayExecutor(gpus_per_cell=1)._n_actors(FakeCluster({"CPU": 4}), 3)
