"""Tensor parallelism on CPU with 2 gloo ranks: TP=2 generates the same greedy tokens as TP=1,
with close logprobs, for every architecture (GQA with fewer KV heads than ranks, Qwen2's
biases, Qwen3's q/k norms, GPT-2's fused Conv1D q/k/v, Mistral), under chunked prefill and
preemption; a killed worker fails the in-flight requests and kills the engine without a hang
(/health 503); workers die with their parent; the server streams with a TP=2 engine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.checkpoints import make_tiny_checkpoint
from tests.test_server_harness import ServerThread, start_tiny_server

# Tiny KV cache (12 blocks of 4 tokens) and a 12-token step budget: every prompt below is
# prefilled in chunks and the four requests (71 tokens in all) cannot all hold their blocks at
# once, so the scheduler preempts. TP=1 and TP=2 schedule identically (rank 0 schedules both).
ENGINE = dict(dtype="float32", device="cpu", attention_backend="torch", block_size=4, num_blocks=12,
              max_num_batched_tokens=12, max_model_len=64)
PROMPTS = [[(7 * i + 13 * j) % 40000 + 100 for j in range(5 + 5 * i)] for i in range(4)]
OVERRIDES = {"llama": dict(num_key_value_heads=1),  # 1 KV head for 2 ranks: replicated
             "qwen2": {}, "qwen3": {}, "gpt2": {}, "mistral": {}}


def _generate(llm: LLM):
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return outs, llm.engine.get_stats().num_preemptions


@pytest.mark.parametrize("arch", list(OVERRIDES))
def test_tp2_matches_tp1(tmp_path, arch):
    path = make_tiny_checkpoint(str(tmp_path / arch), arch, **OVERRIDES[arch])
    ref, ref_preempted = _generate(LLM(path, **ENGINE))
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    try:
        # each rank's KV cache holds only its KV heads: llama's one (replicated), half of the
        # others' 2, half of GPT-2's 4
        model = llm.engine.runner.runner.model
        assert model.kv_spec.num_kv_heads == (2 if arch == "gpt2" else 1)
        assert model.lm_head_weight().shape[0] == 49152 // 2  # vocab-parallel head (tied or not)
        outs, preempted = _generate(llm)
    finally:
        llm.engine.close()
    assert ref_preempted > 0 and preempted == ref_preempted  # the preemption path ran, identically
    for r, o in zip(ref, outs):
        assert list(o.outputs[0].token_ids) == list(r.outputs[0].token_ids)
        for lr, lo in zip(r.outputs[0].logprobs, o.outputs[0].logprobs):
            assert lr.keys() == lo.keys()
            assert all(abs(lr[t] - lo[t]) < 1e-4 for t in lr)
    for p in llm.engine.workers.processes:  # close() stopped the worker
        assert not p.is_alive()


def test_config_refuses_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="enable_lora"):
        EngineConfig(tensor_parallel_size=2, enable_lora=True)


def test_head_counts_that_do_not_split_are_refused():
    from engine.models.tensor_parallel import Shard, TPContext, head_shards, vocab_shard

    tp = TPContext(rank=1, size=3, group=object())
    with pytest.raises(ValueError, match="num_attention_heads"):
        head_shards(4, 2, 16, tp)
    q, kv = head_shards(6, 1, 16, tp)  # one KV head, replicated on all three ranks
    assert (q.start, q.size, kv.start, kv.size) == (32, 32, 0, 16)
    assert vocab_shard(50257, tp) is None  # does not split evenly: the LM head stays whole
    assert vocab_shard(49152, tp) == Shard(16384, 16384, 49152)


def test_cli_flag_sets_the_config():
    from conveyor.cli import build_parser, engine_config

    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2"])
    assert engine_config(args).tensor_parallel_size == 2


def test_torchrun_serve_refuses_what_only_rank_0_would_read(tmp_path, monkeypatch, capsys):
    """Ranks > 0 build their engine from the flags alone: a config's [[models]] or [lora], or
    LoRA flags, would give rank 0 another engine, so every rank refuses them before starting."""
    from conveyor.cli import main

    models, lora = tmp_path / "models.toml", tmp_path / "lora.toml"
    models.write_text('[[models]]\nname = "a"\n')
    lora.write_text("[lora]\nenable_lora = true\n")
    cases = [(["--config", str(models)], "[[models]]"), (["--config", str(lora)], "[lora]"),
             (["--enable-lora"], "--enable-lora")]
    for rank in ("0", "1"):
        for var, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", "2"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "9")):
            monkeypatch.setenv(var, value)
        for flags, words in cases:
            assert main(["serve", "--tensor-parallel-size", "2", *flags]) == 2
            assert words in capsys.readouterr().err


def test_torchrun_ranks_generate_what_one_process_does(tmp_path, capsys):
    """The multi-node path on one machine: torchrun starts both ranks (its agent hosts the
    store they join), rank 0 runs `conveyor generate`, rank 1 the worker loop."""
    import socket

    from conveyor.cli import main

    path = make_tiny_checkpoint(str(tmp_path / "llama"), "llama")
    args = ["generate", "--model", path, "--device", "cpu", "--dtype", "float32", "--attention-backend", "torch",
            "--num-threads", "1", "--num-blocks", "32", "--prompt", "Hello there", "--max-tokens", "6"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port),
                          "-m", "conveyor", *args, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == expected and expected.strip()


def test_more_ranks_than_gpus_is_refused_before_spawning(monkeypatch):
    import torch

    from engine.distributed.launcher import WorkerGroup

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(2\).*1 CUDA device"):
        WorkerGroup.start(EngineConfig(tensor_parallel_size=2), torch.device("cuda"))


def _chat(base_url: str, stream: bool, max_tokens: int = 6):
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)


def _streamed_text(raw: str) -> str:
    events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])


def test_server_streams_with_tp2_then_a_killed_worker_takes_it_down(tmp_path):
    ref = start_tiny_server(tmp_path / "tp1")
    try:
        expected = _streamed_text(_chat(ref.base_url, stream=True).text)
    finally:
        ref.stop()
    srv = start_tiny_server(tmp_path / "tp2", tensor_parallel_size=2)
    try:
        r = _chat(srv.base_url, stream=True)
        assert r.status_code == 200 and _streamed_text(r.text) == expected
        worker = srv.engine.engine.workers.processes[0]
        # A long stream in flight, then the worker dies under it.
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0,
                "ignore_eos": True, "stream": True}) as s:
            lines = s.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # generation has started
            os.kill(worker.pid, signal.SIGKILL)
            rest = [line for line in lines if line]  # ends: the stream does not hang
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert "Traceback" not in error["message"]
        deadline = time.monotonic() + 10
        while httpx.get(srv.base_url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "/health never reported the dead engine"
            time.sleep(0.1)
        assert _chat(srv.base_url, stream=False).status_code == 503
    finally:
        srv.stop()


def test_a_spawned_worker_exits_when_the_engine_process_is_killed():
    """The engine process spawns a worker through the real entry point (here it waits at the
    rendezvous: no rank 0 ever opens the store), then dies by SIGKILL, so no cleanup code of its
    own runs: the worker notices it was orphaned and exits."""
    script = textwrap.dedent("""
        import os, time
        import torch.multiprocessing as mp
        from engine.config import EngineConfig
        from engine.distributed.process_group import RankInfo
        from engine.distributed.worker import run_spawned_worker
        if __name__ == "__main__":
            info = RankInfo(1, 2, 1, "127.0.0.1", 9, spawned=True)  # port 9: nobody listens
            p = mp.get_context("spawn").Process(target=run_spawned_worker, daemon=True,
                                                args=(EngineConfig(tensor_parallel_size=2), info, os.getpid()))
            p.start()
            print(p.pid, flush=True)
            time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        worker_pid = int(parent.stdout.readline())
        time.sleep(1.0)  # let the worker get past its imports and into the rendezvous
        assert _alive(worker_pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(worker_pid):
            assert time.monotonic() < deadline, "the worker outlived its engine"
            time.sleep(0.1)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
