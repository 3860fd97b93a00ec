"""benchmarks/calibrate.py and benchmarks/validate.py: medians over repeated shapes, staggered
bursts that drain through every batch size, the host record, the load rule that refuses
validation on a busy machine, and the validation path end to end on a tiny model."""
from __future__ import annotations

import json

import pytest

from benchmarks import calibrate, validate
from engine.scheduler.cost_model import CostModel, StepSample
from tests.checkpoints import make_tiny_checkpoint


def test_quiet_rule():
    assert calibrate.machine_is_quiet(0.5, 2) == (True, "quiet")
    assert calibrate.machine_is_quiet(2.0, 2)[0]  # 2 / 2 + 1: our own run plus a little
    ok, why = calibrate.machine_is_quiet(2.5, 2)
    assert not ok and "load average 2.5" in why
    assert calibrate.machine_is_quiet(1.0, 16, 0.010, 0.0114)[0]
    ok, why = calibrate.machine_is_quiet(1.0, 16, 0.010, 0.012)
    assert not ok and "+20%" in why


def test_median_per_shape():
    samples = [StepSample(8, 8, 1, t) for t in (0.1, 0.5, 0.2)] + [StepSample(1, 9, 1, 0.03)]
    medians = {(s.num_batched_tokens, s.seconds) for s in calibrate.median_samples(samples)}
    assert medians == {(8, 0.2), (1, 0.03)}


def test_validation_refuses_on_a_loaded_machine(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(validate.os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    monkeypatch.setattr(validate, "make_engine", lambda *a, **k: pytest.fail("an engine was started"))
    calibrate.main(["--validate", "--report", str(tmp_path / "v.json")])  # the old spelling forwards
    report = json.loads((tmp_path / "v.json").read_text())
    assert "load average 40.0" in report["refused"] and report["results"] == {}
    assert report["host"]["nproc"] >= 1 and "torch_cpu_capability" in report["host"]
    assert "refusing to validate" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cal") / "tiny")
    make_tiny_checkpoint(path, "llama")
    return path


def test_calibration_fits_medians_and_records_the_host(tiny, tmp_path):
    out = tmp_path / "cm.json"
    calibrate.main(["--model", tiny, "--dtype", "float32", "--num-blocks", "64", "--batch-sizes", "1,3",
                    "--prompt-lens", "8,40", "--max-tokens", "3", "--repeats", "2", "--out", str(out)])
    model = CostModel.from_json(out)
    info = model.fit_info
    assert info["repeats"] == 2 and info["num_steps_measured"] > info["num_samples"] >= 5
    assert info["host"]["dtype"] == "torch.float32" and info["host"]["torch_threads"] == 1
    assert 0 < info["python_share_of_step"] < 1 and info["matmul_after_s"] > 0 and info["machine"]
    samples = json.loads(out.with_suffix(".samples.json").read_text())
    decode_batches = {s["num_seqs"] for s in samples if s["num_batched_tokens"] == s["num_seqs"]}
    assert {1, 2, 3} <= decode_batches  # the 3-request burst drains through 2 and 1
    assert len(model.row_residual_s) == 3  # the largest burst


def test_forced_validation_reports_every_metric_for_each_workload_and_policy(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "WORKLOADS", {"bursty": ("uniform:4:40", "uniform:1:4", 50.0, 3.0)})
    validate.main(["--force", "--model", tiny, "--dtype", "float32", "--num-blocks", "64",
                   "--num-requests", "4", "--policies", "fcfs,slo", "--report", str(tmp_path / "v.json")])
    report = json.loads((tmp_path / "v.json").read_text())
    assert sorted(report["results"]) == ["bursty/fcfs", "bursty/slo"]
    for res in report["results"].values():
        assert all(res[k]["real"] > 0 and res[k]["sim"] > 0 for k in validate.METRICS)
        assert 0 <= res["goodput"]["real"] <= 1 and 0 <= res["goodput"]["sim"] <= 1
        diag = res["diagnostics"]
        assert diag["steps"]["real"] > 0 and diag["outside_step_ms_per_iteration"] >= 0
    assert report["matmul_after_s"] > 0 and report["num_threads"] == 1 and report["max_abs_rel_error"] >= 0
    # the simulator side again, without the engine: same traces, the stored real figures
    monkeypatch.setattr(validate, "make_engine", lambda *a, **k: pytest.fail("an engine was started"))
    validate.main(["--rescore", str(tmp_path / "v.json"), "--num-requests", "4", "--num-blocks", "64",
                   "--report", str(tmp_path / "r.json")])
    again = json.loads((tmp_path / "r.json").read_text())["results"]
    for key, res in report["results"].items():  # same (default) cost model: the same errors
        for k in validate.METRICS:
            assert again[key][k]["rel_error"] == pytest.approx(res[k]["rel_error"]), (key, k)
