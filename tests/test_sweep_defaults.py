"""The defaults sweep's configuration grid and the benchmark's KV sizing (no timing here)."""
from __future__ import annotations

from benchmarks.peers.conveyor import kv_bytes_for
from benchmarks.sweep_defaults import configurations
from benchmarks.workloads import mixed_workload
from engine.config import EngineConfig


def test_configurations_vary_one_factor_around_the_defaults():
    d = EngineConfig()
    cfgs = configurations([16, 32, 64, 128], [512, 1024, 2048, 4096], [64, 128, 256])
    assert cfgs[0] == {"block_size": d.block_size, "max_num_batched_tokens": d.max_num_batched_tokens,
                       "max_num_seqs": d.max_num_seqs}
    assert len(cfgs) == len({tuple(sorted(c.items())) for c in cfgs})  # no duplicates
    for c in cfgs[1:]:
        assert sum(c[k] != cfgs[0][k] for k in c) == 1
    assert {c["block_size"] for c in cfgs} == {16, 32, 64, 128}
    assert {c["max_num_batched_tokens"] for c in cfgs} == {512, 1024, 2048, 4096}
    assert {c["max_num_seqs"] for c in cfgs} == {64, 128, 256}
    # one value per factor is the default itself: 4 + 4 + 3 - 2 duplicates of it
    assert len(cfgs) == 9


def test_kv_budget_counts_the_cache_dtype_and_block_rounding(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path)
    wl = mixed_workload(5, (3, 40), (2, 9), seed=1)
    per_token_fp32 = 2 * 2 * 2 * 16 * 4  # K and V, layers, KV heads, head_dim, bytes
    blocks = sum(-(-(len(r.prompt_ids) + r.output_len) // 16) for r in wl.requests)
    fp32 = kv_bytes_for(str(tmp_path), wl, 4, 16)
    assert fp32 == int(blocks * 16 * per_token_fp32 * 1.25) + (1 << 20)
    assert kv_bytes_for(str(tmp_path), wl, 2, 16) - (1 << 20) == (fp32 - (1 << 20)) // 2
    # bigger blocks round every request up further, never down
    assert kv_bytes_for(str(tmp_path), wl, 4, 128) > fp32


def test_cpu_time_throughput_and_goal_verdicts():
    from benchmarks.stats import RequestRecord, RunResult, summarize_run
    from benchmarks.throughput import verdict_lines

    def summary(system, wall, cpu, mem):
        recs = [RequestRecord(10, 50, 0.5, wall), RequestRecord(10, 50, 0.5, wall)]
        s = summarize_run(RunResult(system, "mixed 2x", wall, recs, peak_mem_bytes=mem << 20,
                                    notes={"cpu_s": cpu} if cpu else {}))
        return s

    conv = summary("conveyor", 10.0, 4.0, 100)
    assert conv["output_tok_s"] == 10.0 and conv["out_tok_per_cpu_s"] == 25.0
    no_cpu = summary("hf-static", 20.0, None, 100)
    assert no_cpu["out_tok_per_cpu_s"] != no_cpu["out_tok_per_cpu_s"]  # NaN when not recorded
    vllm = summary("vllm-offline", 5.0, 5.0, 400)
    mixed = verdict_lines([conv, no_cpu, vllm], "mixed 2x")
    assert "Conveyor / vllm-offline: 0.50x output tokens/s, 1.25x per CPU-second" in mixed
    assert "Goal (>= 4.0x hf-static): Conveyor FALLS SHORT of it (2.00x)." in mixed
    assert "Goal (peak memory <= 0.5x vllm-offline): Conveyor meets it (0.25x)." in mixed
    fixed = verdict_lines([conv, no_cpu, vllm], "fixed 2x")
    assert not any("4.0x hf-static" in line for line in fixed)  # that goal is for mixed only
    assert "Goal (>= 1.3x vllm-offline): Conveyor FALLS SHORT of it (0.50x)." in fixed
