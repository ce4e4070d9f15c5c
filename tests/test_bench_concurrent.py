"""Several runs sharing one device: `bench --concurrent` and `sweep --jobs N` on a single GPU.

The runs are real spawned processes training a tiny net on synthetic data; no timing is asserted, only
what the figures must satisfy whatever the machine, and the verdict's sentences on hand-made rows.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from depthbench import bench
from depthbench.bench import probes
from depthbench.bench.concurrent import share_device
from depthbench.cli import app
from depthbench.errors import DepthbenchError
from depthbench.executors import ParallelExecutor
from depthbench.executors.local import threads_per_job

runner = CliRunner()
TINY = ("--depth", "8", "--batch-size", "16", "--steps", "3", "--warmup", "1", "--data", "synthetic",
        "--train-subset", "64", "--device", "cpu", "--no-compile")


@pytest.fixture(autouse=True)
def _small_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "MATMUL_SIZES", {"cpu": (256,), "cuda": (256,)})


def test_concurrent_runs_one_then_two_processes_and_adds_up_their_rates() -> None:
    result = runner.invoke(app, ["bench", "--concurrent", "2", *TINY, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["mode"], out["depth"], out["device"], out["cuda_graph"]) == ("concurrent", 8, "cpu", True)
    one, two = out["rows"]  # one run alone comes first even when not asked for: it is the reference
    assert (one["runs"], two["runs"]) == (1, 2)
    assert (one["threads_per_run"], two["threads_per_run"]) == (threads_per_job(1), threads_per_job(2))
    for row in (one, two):
        assert row["total_img_per_s"] > 0 and row["peak_mem_mb"] > 0 and row["noise"] >= 0
        assert row["per_run_img_per_s"] == pytest.approx(row["total_img_per_s"] / row["runs"])
        assert row["slowest_run_img_per_s"] <= row["per_run_img_per_s"] * (1 + 1e-9)
        assert row["device_used_mb"] is None  # a GPU's figure
    assert one["speedup"] == 1.0 and one["slowest_run_img_per_s"] == pytest.approx(one["total_img_per_s"])
    assert two["speedup"] == pytest.approx(two["total_img_per_s"] / one["total_img_per_s"])
    # Each run's own rate counts only its timed steps: the wall-clock rate over all of them cannot beat the sum.
    assert two["wall_img_per_s"] <= two["total_img_per_s"] * 1.001
    assert two["peak_mem_mb"] > one["peak_mem_mb"]  # two processes, each with its interpreter, data and net
    assert out["verdict"] == bench.sharing_verdict(out["rows"])


def test_an_error_in_one_run_ends_them_all_as_one_message() -> None:
    # Its batch is larger than its training set: each process fails setting up, before the barrier.
    spec = bench.BenchSpec(depth=8, batch_size=128, device="cpu")
    dataset, _ = bench.spec.bench_dataset("synthetic", 64)
    cfg = bench.spec.run_config(spec, dataset)
    with pytest.raises(DepthbenchError, match=r"^with 2 runs at once: train\.batch_size \(128\) is larger than the "
                                              r"training set \(64 images\); lower it$"):
        share_device(cfg, 2, steps=2, warmup=1)


def _row(runs: int, speedup: float, noise: float = 0.02) -> dict:
    return {"runs": runs, "speedup": speedup, "noise": noise}


def test_sharing_verdict_counts_only_gains_beyond_the_noise() -> None:
    noise = "(noise 5%: one run's spread over its timing windows, at least 5%)"
    assert bench.sharing_verdict([_row(1, 1.0), _row(2, 1.6), _row(4, 1.9)]) == (
        f"sharing pays: 4 runs at once train 1.90x the images/s of one run alone {noise}")
    assert bench.sharing_verdict([_row(1, 1.0), _row(2, 1.04)]) == (
        f"sharing does not pay beyond the noise: at best 2 runs at once train 1.04x the images/s of one run "
        f"alone {noise}")
    assert bench.sharing_verdict([_row(1, 1.0), _row(2, 0.7), _row(4, 0.5)]) == (
        f"sharing costs: any number of runs at once trains fewer images/s in total than one run alone "
        f"(at best 0.70x, 2 runs) {noise}")
    # A noisy reference widens the margin: a 1.2x gain within a 30% spread is not a gain.
    assert bench.sharing_verdict([_row(1, 1.0, noise=0.3), _row(2, 1.2)]).startswith(
        "sharing does not pay beyond the noise: at best 2 runs at once train 1.20x")
    assert bench.sharing_verdict([_row(1, 1.0)]) == (
        "one run only: nothing to compare it with; add counts, e.g. --concurrent 1,2,4")


def test_sweep_jobs_on_one_gpu_puts_every_worker_on_it() -> None:
    # `sweep --jobs 3` with one visible GPU: all three workers train on it at once, none waits for another.
    # The GPU list is given, so this runs anywhere (the workers never touch a GPU here).
    pool, events, _ = ParallelExecutor(3)._open_pool(["0"])
    with pool:
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]  # each submit starts a worker, up to --jobs
        workers = dict(events.get(timeout=120)[1:] for _ in range(3))
    assert len(workers) == 3  # three processes
    assert list(workers.values()) == [("0", threads_per_job(3))] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_concurrent_runs_share_one_gpu() -> None:
    args = [a if a != "cpu" else "cuda" for a in TINY]
    result = runner.invoke(app, ["bench", "--concurrent", "1,2", *args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    one, two = json.loads(result.stdout)["rows"]
    assert two["device_used_mb"] > one["device_used_mb"] > 0  # a second CUDA context and its tensors
    assert two["speedup"] == pytest.approx(two["total_img_per_s"] / one["total_img_per_s"])
