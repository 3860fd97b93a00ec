"""The scheduler simulator, its cost model and traces: every request completes with consistent
timestamps, simulated time follows the cost model exactly, policies change the order, and large
traces run fast."""
import json
import time

import numpy as np
import pytest

from benchmarks import simulate as simulate_cli
from engine.scheduler.cost_model import CostModel, StepSample, load_cost_model
from engine.scheduler.simulator import SimConfig, Simulator, simulate
from engine.scheduler.traces import (LengthDist, TraceRequest, TraceSpec, generate_trace, load_trace,
                                     save_trace)

SMALL = SimConfig(num_blocks=24, block_size=4, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=512)


def small_trace(n=40, seed=0, **kw):
    spec = dict(num_requests=n, rate=50.0, prompt_len="uniform:2:40", output_len="uniform:1:20", seed=seed)
    spec.update(kw)
    return generate_trace(TraceSpec(**spec))


def test_every_request_completes_with_consistent_metrics():
    trace = small_trace()
    sim = Simulator(SMALL, CostModel(), "fcfs")
    result = sim.run(trace)
    assert sorted(r.request_id for r in result.records) == sorted(t.request_id for t in trace)
    by_id = {t.request_id: t for t in trace}
    for rec in result.records:
        t = by_id[rec.request_id]
        assert (rec.prompt_len, rec.output_len, rec.arrival_time) == (t.prompt_len, t.output_len, t.arrival_time)
        assert rec.arrival_time <= rec.first_scheduled_time < rec.first_token_time <= rec.finished_time
        assert 0 < rec.ttft <= rec.e2e
    sim.kv.check_integrity()
    assert sim.kv.num_free_blocks == SMALL.num_blocks and not sim.scheduler.has_unfinished()
    s = result.summary()
    assert s["throughput_out_tok_s"] > 0 and s["num_requests"] == len(trace)
    assert s["ttft_s"]["p50"] <= s["ttft_s"]["p99"] <= s["e2e_s"]["p99"] + 1e-9
    assert result.num_preemptions > 0  # 24 blocks of 4 tokens is tight for this trace
    assert len(result.timeline.time) == result.num_steps and max(result.timeline.kv_usage) <= 1.0


def test_simulated_time_follows_the_cost_model_exactly():
    # 1 s per step plus 0.01 s per new token: a 20-token prompt with budget 8 prefills in chunks
    # of 8, 8, 4, then decodes one token per step.
    cost = CostModel(base_s=1.0, per_token_s=0.01, per_context_token_s=0.0, per_seq_s=0.0)
    cfg = SimConfig(num_blocks=32, block_size=4, max_num_batched_tokens=8, max_num_seqs=4)
    trace = [TraceRequest("a", 2.5, prompt_len=20, output_len=4)]
    rec = simulate(trace, "fcfs", cfg, cost).records[0]
    assert rec.first_scheduled_time == 2.5
    assert rec.ttft == pytest.approx(3 * 1.0 + 0.01 * 20)
    assert rec.tpot == pytest.approx(1.01)  # each later token costs one single-token step
    assert rec.e2e == pytest.approx(3.2 + 3 * 1.01)


def test_context_term_uses_sequence_lengths_after_the_step():
    cost = CostModel(base_s=0.0, per_token_s=0.0, per_context_token_s=1.0, per_seq_s=0.0)
    cfg = SimConfig(num_blocks=32, block_size=4, max_num_batched_tokens=64)
    rec = simulate([TraceRequest("a", 0.0, prompt_len=10, output_len=3)], "fcfs", cfg, cost).records[0]
    # steps read contexts 10, 11, 12
    assert rec.ttft == pytest.approx(10) and rec.e2e == pytest.approx(10 + 11 + 12)


def test_priority_policy_serves_urgent_requests_first():
    trace = small_trace(n=60, rate=50.0, priorities={0: 0.7, -1: 0.3}, seed=3)
    cfg = SimConfig(num_blocks=256, block_size=4, max_num_batched_tokens=32, max_num_seqs=2)

    def mean_ttft(policy, priority):
        recs = simulate(trace, policy, cfg).records
        return np.mean([r.ttft for r in recs if r.priority == priority])

    assert mean_ttft("priority", -1) < 0.5 * mean_ttft("fcfs", -1)
    assert mean_ttft("priority", 0) > mean_ttft("fcfs", 0)  # the others pay for it


def test_fair_policy_protects_the_light_tenant_in_simulation():
    trace = small_trace(n=80, rate=50.0, tenants={"heavy": 0.85, "light": 0.15}, seed=4)
    cfg = SimConfig(num_blocks=256, block_size=4, max_num_batched_tokens=32, max_num_seqs=2)
    light = {p: simulate(trace, p, cfg).summary()["per_tenant"]["light"]["ttft_s"]["mean"] for p in ("fcfs", "fair")}
    assert light["fair"] < light["fcfs"]


def test_same_inputs_give_the_same_result():
    trace = small_trace(seed=5)
    a, b = simulate(trace, "sjf", SMALL), simulate(trace, "sjf", SMALL)
    assert [(r.request_id, r.finished_time) for r in a.records] == [(r.request_id, r.finished_time) for r in b.records]


def test_shared_system_prompt_hits_prefix_cache():
    trace = small_trace(n=10, system_prompt_len=32, tenants={"t": 1.0}, seed=6)
    cfg = SimConfig(num_blocks=256, block_size=4, max_num_batched_tokens=256)
    records = simulate(trace, "fcfs", cfg).records
    assert sum(r.num_cached_tokens >= 32 for r in records) >= len(records) - 1


def test_request_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match="KV cache capacity"):
        simulate([TraceRequest("big", 0.0, prompt_len=300, output_len=10)], "fcfs", SMALL)
    with pytest.raises(ValueError, match="max_model_len"):
        simulate([TraceRequest("long", 0.0, prompt_len=100, output_len=500)], "fcfs",
                 SimConfig(num_blocks=1000, max_model_len=512))


def test_2000_requests_simulate_quickly():
    trace = generate_trace(TraceSpec(num_requests=2000, rate=20.0, prompt_len="lognormal:64:0.5:256",
                                     output_len="lognormal:16:0.5:64", seed=7))
    started = time.perf_counter()
    result = simulate(trace, "fcfs", SimConfig(num_blocks=1024, max_num_batched_tokens=1024, max_num_seqs=64))
    assert len(result.records) == 2000
    assert time.perf_counter() - started < 60  # generous; typically a few seconds


# -- cost model ---------------------------------------------------------------------------------
def test_cost_model_fit_recovers_coefficients():
    rng = np.random.default_rng(0)
    truth = CostModel(base_s=0.02, per_token_s=3e-4, per_context_token_s=2e-6, per_seq_s=1e-3, multi_row_s=0.015)
    samples = []
    for _ in range(200):
        seqs, ctx = int(rng.integers(1, 32)), int(rng.integers(1, 8000))
        tokens = 1 if rng.random() < 0.2 else int(rng.integers(seqs, 512))  # batch-1 decodes, then bigger steps
        seqs = 1 if tokens == 1 else seqs
        noise = 1 + 0.01 * rng.standard_normal()
        samples.append(StepSample(tokens, ctx, seqs, truth.step_time(tokens, ctx, seqs) * noise))
    fit = CostModel.fit(samples)
    for name in ("base_s", "per_token_s", "per_context_token_s", "per_seq_s", "multi_row_s"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=0.1), name
    assert fit.fit_info["mean_abs_rel_error"] < 0.02
    assert truth.step_time(2, 10, 2) - truth.step_time(1, 10, 1) == pytest.approx(0.015 + 3e-4 + 1e-3)


def test_cost_model_fit_weighs_relative_error():
    """A few slow prefills must not buy their fit with a large relative error on many fast decodes."""
    decodes = [StepSample(1, 100 + i, 1, 0.050) for i in range(30)] + [StepSample(4, 400 + i, 4, 0.080) for i in range(30)]
    prefills = [StepSample(512, 512, 1, 2.0), StepSample(256, 256, 1, 1.0), StepSample(128, 128, 1, 0.55)]
    fit = CostModel.fit(decodes + prefills)
    assert fit.fit_info["decode_mean_abs_rel_error"] < 0.05


def test_cost_model_row_table_captures_what_the_linear_terms_cannot():
    """3-row steps slower than 4-row ones (a BLAS kernel effect): the residual table says so."""
    truth = CostModel(0.05, 3e-3, 0.0, 0.0, multi_row_s=0.01)
    slow = {3: 0.04}  # seconds a 3-token step takes beyond the linear terms
    samples = [StepSample(t, 10 * t, min(t, 8), truth.step_time(t, 10 * t, min(t, 8)) + slow.get(t, 0.0))
               for t in [1, 2, 3, 4, 5, 6, 7, 8, 16, 64, 128, 256, 512] for _ in range(3)]
    fit = CostModel.fit(samples, row_table=8)
    assert len(fit.row_residual_s) == 8
    assert fit.step_time(3, 30, 3) > fit.step_time(4, 40, 4)
    assert fit.step_time(3, 30, 3) == pytest.approx(truth.step_time(3, 30, 3) + 0.04, rel=0.05)
    assert fit.fit_info["mean_abs_rel_error"] < fit.fit_info["linear_terms_mean_abs_rel_error"]
    assert CostModel.fit(samples).row_residual_s == ()  # only when asked for


def test_cost_model_fit_keeps_coefficients_non_negative():
    rng = np.random.default_rng(1)
    # step time falls slightly with batch size: an unconstrained fit would go negative
    samples = [StepSample(int(t), int(c), int(s), 0.05 + 1e-4 * t - 1e-4 * s)
               for t, c, s in rng.integers(1, 64, size=(50, 3))]
    fit = CostModel.fit(samples)
    assert min(fit.base_s, fit.per_token_s, fit.per_context_token_s, fit.per_seq_s) >= 0
    assert fit.per_token_s > 0


def test_cost_model_json_round_trip_and_validation(tmp_path):
    model = CostModel(0.1, 0.2, 0.3, 0.4, source="test", multi_row_s=0.5, row_residual_s=(0.01, -0.02))
    model.to_json(tmp_path / "m.json")
    assert load_cost_model(tmp_path / "m.json") == model
    (tmp_path / "old.json").write_text(json.dumps({"base_s": 1.0, "per_token_s": 0.0, "per_context_token_s": 0.0,
                                                   "per_seq_s": 0.0}))  # written before multi_row_s existed
    assert load_cost_model(tmp_path / "old.json").multi_row_s == 0.0
    assert load_cost_model(None) == CostModel()
    with pytest.raises(ValueError, match="per_seq_s"):
        CostModel(per_seq_s=-1.0)
    (tmp_path / "bad.json").write_text(json.dumps({"base_s": 1.0}))
    with pytest.raises(ValueError, match="per_token_s"):
        load_cost_model(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="samples"):
        CostModel.fit([StepSample(1, 1, 1, 0.1)])


# -- traces -------------------------------------------------------------------------------------
def test_arrival_processes_have_the_requested_rate_and_burstiness():
    for arrival, cv in (("poisson", 1.0), ("gamma", 3.0)):
        trace = generate_trace(TraceSpec(num_requests=20000, rate=10.0, arrival=arrival, cv=cv, seed=2))
        gaps = np.diff([t.arrival_time for t in trace])
        assert gaps.mean() == pytest.approx(0.1, rel=0.1)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)


def test_length_distributions_and_errors():
    rng = np.random.default_rng(0)
    assert (LengthDist.parse("fixed:7").sample(rng, 5) == 7).all()
    u = LengthDist.parse("uniform:3:5").sample(rng, 1000)
    assert u.min() == 3 and u.max() == 5
    ln = LengthDist.parse("lognormal:100:0.5:300").sample(rng, 5000)
    assert np.median(ln) == pytest.approx(100, rel=0.1) and ln.max() <= 300
    with pytest.raises(ValueError, match="prompt_len"):
        LengthDist.parse("normal:3", "prompt_len")
    with pytest.raises(ValueError, match="rate"):
        TraceSpec(rate=0)
    with pytest.raises(ValueError, match="output_len"):
        TraceRequest("x", 0.0, prompt_len=4, output_len=0)


def test_trace_file_round_trip(tmp_path):
    trace = small_trace(n=5, tenants={"a": 1.0}, priorities={0: 0.5, 2: 0.5})
    save_trace(trace, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == trace
    (tmp_path / "rec.jsonl").write_text('{"arrival_time": 10.5, "prompt_len": 3, "output_len": 2}\n'
                                        '{"arrival_time": 10.0, "prompt_len": 4, "output_len": 1}\n')
    loaded = load_trace(tmp_path / "rec.jsonl")
    assert [(t.arrival_time, t.prompt_len) for t in loaded] == [(0.0, 4), (0.5, 3)]
    (tmp_path / "bad.jsonl").write_text('{"arrival_time": 1.0, "prompt_len": 3}\n')
    with pytest.raises(ValueError, match="output_len"):
        load_trace(tmp_path / "bad.jsonl")


def test_cli_compares_policies_and_writes_summary_and_plot(tmp_path, capsys):
    simulate_cli.main(["--policies", "fcfs,fair", "--num-requests", "30", "--rate", "10",
                       "--prompt-len", "uniform:4:32", "--output-len", "uniform:1:8", "--tenants", "a:0.5,b:0.5",
                       "--num-blocks", "64", "--out-dir", str(tmp_path)])
    summary = json.loads((tmp_path / "simulate_summary.json").read_text())
    assert [s["policy"] for s in summary["summaries"]] == ["fcfs", "fair"]
    assert all(s["num_requests"] == 30 for s in summary["summaries"])
    assert (tmp_path / "simulate.png").stat().st_size > 10_000
    assert "fair" in capsys.readouterr().out
    with pytest.raises(ValueError, match="tenants"):
        simulate_cli.main(["--tenants", "a0.5", "--out-dir", str(tmp_path)])


def test_moving_key_policies_admit_exactly_as_a_full_resort_would():
    """fair (per-tenant heaps) and slo (lazy heap) give the same schedule as re-keying the
    whole waiting queue every step, which is what their fast paths replace."""
    from engine.scheduler.policies import FairPolicy, SchedulingPolicy, SLOPolicy

    class FairFullSort(FairPolicy):
        queue_group = SchedulingPolicy.queue_group

    class SLOFullSort(SLOPolicy):
        keys_only_grow = False

    trace = generate_trace(TraceSpec(num_requests=150, rate=40, arrival="gamma", cv=2, tenants={"a": 0.7, "b": 0.3},
                                     prompt_len="uniform:8:96", output_len="uniform:16:64", seed=5))
    config = SimConfig(num_blocks=24, max_num_batched_tokens=128, max_num_seqs=8)
    for fast, full in ((FairPolicy(), FairFullSort()), (SLOPolicy(0.5, 0.05, 2000.0), SLOFullSort(0.5, 0.05, 2000.0))):
        a, b = simulate(trace, fast, config), simulate(trace, full, config)
        assert [(r.request_id, r.first_token_time, r.finished_time) for r in a.records] == \
            [(r.request_id, r.first_token_time, r.finished_time) for r in b.records]
        assert a.num_preemptions == b.num_preemptions > 0


def test_goodput_and_jain_index():
    from engine.scheduler.simulator import jain_index

    assert jain_index([5, 5, 5]) == 1.0 and jain_index([9, 0, 0]) == pytest.approx(1 / 3)
    result = simulate(generate_trace(TraceSpec(num_requests=40, rate=20, tenants={"a": 0.5, "b": 0.5}, seed=2,
                                               prompt_len="uniform:4:32", output_len="uniform:1:8")), "fcfs")
    s = result.summary(ttft_slo=0.5, tpot_slo=0.05)
    met = sum(r.ttft <= 0.5 and not r.tpot > 0.05 for r in result.records)
    assert s["goodput"] == met / 40 and result.goodput(None, None) == 1.0
    assert 0.5 <= s["jain_fairness"] <= 1.0 and set(s["per_tenant"]["a"]["tpot_s"]) == {"mean", "p50", "p90", "p99"}


def test_server_trace_lines_load_and_skip_requests_the_engine_did_not_run(tmp_path):
    row = {"request_id": "r", "arrival_time": 1700000000.5, "prompt_len": 7, "output_len": 3, "cached_tokens": 0,
           "tenant": "t", "priority": None, "model": "m", "ttft_s": 0.1, "finished_time": 1700000001.0,
           "finish_reason": "length", "status": 200, "source": "engine", "preemptions": 0, "stream": False}
    rows = [row, {**row, "status": 429, "prompt_len": 0, "output_len": 0}, {**row, "source": "response"},
            {**row, "arrival_time": 1700000002.0, "priority": 1}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_trace(tmp_path / "s.jsonl")
    assert [(t.arrival_time, t.prompt_len, t.priority, t.tenant) for t in loaded] == [(0.0, 7, 0, "t"), (1.5, 7, 1, "t")]


def test_docs_step_3_compares_policies_on_a_server_trace_with_a_fitted_cost_model(tmp_path):
    """docs/scheduling.md, "five commands", step 3: the file `conveyor serve --trace-file` writes,
    a cost model JSON as `benchmarks.calibrate` writes it, three policies, goodput, a plot."""
    row = {"request_id": "r", "arrival_time": 1700000000.0, "prompt_len": 40, "output_len": 12, "cached_tokens": 0,
           "tenant": "a", "priority": None, "model": "m", "ttft_s": 0.1, "finished_time": 1700000001.0,
           "finish_reason": "length", "status": 200, "source": "engine", "preemptions": 0, "stream": False}
    rows = [{**row, "request_id": f"r{i}", "arrival_time": row["arrival_time"] + 0.05 * i,
             "prompt_len": 8 + 7 * (i % 5), "tenant": "ab"[i % 2]} for i in range(40)]
    (tmp_path / "prod-trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    CostModel(0.02, 1e-3, 1e-6, 1e-3, source="test", multi_row_s=0.01).to_json(tmp_path / "cm.json")
    simulate_cli.main(["--trace", str(tmp_path / "prod-trace.jsonl"), "--policies", "fcfs,fair,slo",
                       "--ttft-slo", "2", "--tpot-slo", "0.1", "--cost-model", str(tmp_path / "cm.json"),
                       "--num-blocks", "256", "--out-dir", str(tmp_path / "prod")])
    summary = json.loads((tmp_path / "prod" / "simulate_summary.json").read_text())
    assert [s["policy"] for s in summary["summaries"]] == ["fcfs", "fair", "slo"]
    assert all(s["num_requests"] == 40 and 0 <= s["goodput"] <= 1 for s in summary["summaries"])
    assert (tmp_path / "prod" / "simulate.png").stat().st_size > 10_000
