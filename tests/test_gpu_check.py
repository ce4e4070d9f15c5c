"""scripts/gpu_check.py's own rules: the GPU budget, which packages the rehearsal hides, how curves compare.

The whole check runs as `make rehearse` (CI calls it after `make test`); these tests pin the pieces a
rehearsal on CPU cannot show: the GPU timeouts' sum and the verdicts on numbers no CPU run produces.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up while the class is made
spec.loader.exec_module(gpu_check)


def test_gpu_parts_fit_in_eight_minutes() -> None:
    t = gpu_check.TIMEOUTS["gpu"]
    benches = sum(2 * t[f"bench {depth}"] for depth in (*gpu_check.GPU.bench_depths, "vit"))  # graphed and eager
    others = sum(seconds for part, seconds in t.items() if not part.startswith("bench "))
    assert benches + others < 8 * 60
    assert set(gpu_check.GPU.bench_steps) == set(gpu_check.GPU.bench_depths)
    assert {f"bench {d}" for d in (*gpu_check.REHEARSAL.bench_depths, "vit")} <= set(gpu_check.TIMEOUTS["rehearse"])


def test_output_stays_within_the_files_the_check_keeps() -> None:
    assert len(gpu_check.OUT_FILES) == 5 <= gpu_check.OUT_LIMIT == 8


@pytest.mark.parametrize(("entry", "hidden"), [
    ("pydantic", True), ("pydantic-2.14.4.dist-info", True), ("pydantic_core", True),
    ("pydantic_core-2.50.5.dist-info", True), ("annotated_types-0.8.0.dist-info", True),
    ("typing_inspection", True), ("pytest_timeout.py", True), ("pytest_timeout-2.4.0.dist-info", True),
    ("ray", True), ("submitit-1.5.4.dist-info", True), ("depthbench-0.1.0.dist-info", True),
    ("__editable__.depthbench-0.1.0.pth", True), ("__editable___depthbench_0_1_0_finder.py", True),
    ("typing_extensions.py", False), ("torch", False), ("_pytest", False), ("pytest", False),
    ("distutils-precedence.pth", False), ("annotated_doc", False),
])
def test_rehearsal_hides_what_the_gpu_image_lacks(entry: str, hidden: bool) -> None:
    assert (gpu_check.top_name(entry) in gpu_check.NOT_ON_IMAGE) is hidden


def test_strip_missing_links_the_rest(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for name in ("pydantic", "torch", "yaml"):
        (site / name).mkdir(parents=True)
    (site / "pytest_timeout.py").write_text("")
    copy = gpu_check.strip_missing(site, tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == ["torch", "yaml"]
    assert (copy / "torch").resolve() == site / "torch"


def run(losses: dict[int, float], status: str = "completed") -> dict:
    return {"result": {"status": status, "test_acc": 0.5},
            "rows": [{"step": step, "train_loss": loss} for step, loss in losses.items()]}


def test_compare_curves_reports_the_largest_gap_and_final_losses() -> None:
    status, line, data = gpu_check.compare_curves(run({10: 2.0, 20: 1.5, 30: 1.25}), run({10: 2.0, 20: 1.75, 30: 1.0}))
    assert status == "ok"
    assert (data["max_abs_diff"], data["at_step"], data["final_a"], data["final_b"]) == (0.25, 20, 1.25, 1.0)
    assert line == "max |Δ train loss| 0.2500 (step 20) over 3 log points; final 1.2500 vs 1.0000"


def test_compare_curves_fails_on_a_diverged_or_shorter_run() -> None:
    status, line, _ = gpu_check.compare_curves(run({10: 2.0, 20: 1.5}), run({10: 2.0, 20: float("nan")}, "diverged"))
    assert status == "FAIL" and line.endswith("1 not finite (completed, diverged)")
    status, _, _ = gpu_check.compare_curves(run({10: 2.0, 20: 1.5}), run({10: 2.0}))
    assert status == "FAIL"


def test_bench_line_says_n_a_for_figures_a_bench_does_not_report() -> None:
    result = {"step_s": 0.0125, "img_per_s": 10240.0, "peak_mem_mb": 812.4, "paper_run_h": 0.2222,
              "precision": "bfloat16", "batch_size": 128}
    assert gpu_check.bench_line(result) == ("12.5 ms/step, 10240 img/s, peak 812 MB, 64k steps 0.22 h, "
                                           "host n/a ms/step, n/a kernels/step (bfloat16, batch 128)")
    assert "host 0.40 ms/step, 3 kernels/step" in gpu_check.bench_line(
        {**result, "host_ms_per_step": 0.4, "kernels_per_step": 3})


def test_concurrent_line_gives_each_count_its_total_and_the_verdict() -> None:
    result = {"rows": [{"runs": 1, "total_img_per_s": 9000.0, "speedup": 1.0},
                       {"runs": 2, "total_img_per_s": 15300.0, "speedup": 1.7}], "verdict": "sharing pays"}
    assert gpu_check.concurrent_line(result) == ("total 1 at once 9000 img/s (1.00x), 2 at once 15300 img/s (1.70x); "
                                                 "sharing pays")
