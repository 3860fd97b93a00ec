"""AsyncEngine: outputs match the synchronous engine, rejects reach the caller as ValueError,
leaving early aborts and frees blocks, and a dead engine thread fails pending requests."""
from __future__ import annotations

import asyncio
import time

import pytest

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.test_server_harness import tiny_config


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return tiny_config(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def engine(config):
    eng = AsyncEngine(config)
    assert eng.wait_ready(120), eng.errored
    yield eng
    eng.shutdown()


def _sync_generate(config, prompts, params):
    llm = LLMEngine(config)
    for i, p in enumerate(prompts):
        llm.add_request(str(i), p, params)
    final = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            final[out.request_id] = out
    return [final[str(i)].outputs[0].token_ids for i in range(len(prompts))]


async def _collect(engine, prompt, params, rid):
    outs = [out async for out in engine.generate(prompt, params, rid)]
    return outs


def test_concurrent_generate_matches_sync_engine(engine, config):
    prompts = ["The quick brown fox", "Paged attention is", "Hello"]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = _sync_generate(config, prompts, params)

    async def main():
        return await asyncio.gather(*[_collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts)])

    results = asyncio.run(main())
    for outs, want in zip(results, expected):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        # cumulative: every output extends the previous one
        for a, b in zip(outs, outs[1:]):
            assert b.outputs[0].token_ids[: len(a.outputs[0].token_ids)] == a.outputs[0].token_ids
        assert outs[-1].outputs[0].token_ids == want
        assert outs[-1].outputs[0].finish_reason == "length"


def test_rejected_request_raises_value_error_before_first_output(engine):
    too_long = list(range(10, 10 + engine.max_model_len + 5))

    async def main():
        agen = engine.generate(too_long, SamplingParams(max_tokens=4), "too-long")
        with pytest.raises(ValueError, match="maximum context length is"):
            await anext(agen)
        # the id is free again: a valid request under the same id runs
        outs = await _collect(engine, "hi", SamplingParams(max_tokens=2, ignore_eos=True), "too-long")
        return outs

    outs = asyncio.run(main())
    assert len(outs[-1].outputs[0].token_ids) == 2


def test_leaving_early_aborts_and_frees_blocks(engine):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        seen = 0
        async for out in engine.generate("a long story begins", params, "early"):
            seen = len(out.outputs[0].token_ids)
            if seen >= 3:
                break
        return seen

    assert asyncio.run(main()) == 3
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = engine.get_stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0:
            break
        time.sleep(0.02)
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert engine.num_in_flight == 0
    assert stats.generation_tokens < 200  # it did not run to the end in the background


def test_cancelled_task_aborts(engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    async def main():
        got_first = asyncio.Event()

        async def consume():
            async for _ in engine.generate("cancel me", params, "cancelled"):
                got_first.set()

        task = asyncio.create_task(consume())
        await got_first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while engine.get_stats().num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.get_stats().num_running == 0
    assert engine.get_stats().kv_cache_usage == 0.0


def test_engine_thread_death_fails_pending_requests(config):
    def factory():
        llm = LLMEngine(config)
        real_step = llm.step
        calls = {"n": 0}

        def failing_step():
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("simulated device failure")
            return real_step()

        llm.step = failing_step
        return llm

    eng = AsyncEngine(config, engine_factory=factory)
    assert eng.wait_ready(120)

    async def main():
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate("doomed", SamplingParams(max_tokens=50, ignore_eos=True), "d"):
                pass
        with pytest.raises(EngineDeadError):
            await anext(eng.generate("after", SamplingParams(max_tokens=2), "after"))

    try:
        asyncio.run(main())
        assert not eng.is_ready
        assert isinstance(eng.errored, RuntimeError)
    finally:
        eng.shutdown()


def test_failed_step_fails_its_request_only_and_engine_keeps_serving(config):
    from engine.async_engine import RequestFailedError

    def factory():
        llm = LLMEngine(config)
        real = llm.runner.execute

        def execute(out):
            if any(s.request_id == "victim" for s in out.scheduled):
                raise IndexError("simulated failure inside the step")
            return real(out)

        llm.runner.execute = execute
        real_add = llm.add_request

        def add_request(request_id, *args, **kwargs):
            if request_id == "unaddable":
                raise KeyError("simulated bug while adding")
            return real_add(request_id, *args, **kwargs)

        llm.add_request = add_request
        return llm

    def bad_observer(info):
        raise RuntimeError("observer bug")

    eng = AsyncEngine(config, engine_factory=factory, on_step=bad_observer)
    assert eng.wait_ready(120)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def main():
        with pytest.raises(RequestFailedError):
            await _collect(eng, "doomed", params, "victim")
        with pytest.raises(RequestFailedError):
            await _collect(eng, "cannot add", params, "unaddable")
        return await asyncio.gather(*[_collect(eng, p, params, f"ok{i}") for i, p in enumerate(["a", "b c"])])

    try:
        results = asyncio.run(main())
        for outs in results:
            assert outs[-1].finished and outs[-1].error is None and len(outs[-1].outputs[0].token_ids) == 4
        assert eng.is_ready and eng.errored is None
        deadline = time.monotonic() + 10  # stats are published just after the outputs
        while eng.get_stats().num_running and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = eng.get_stats()
        assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
        eng.engine.check_integrity()  # read-only; the engine thread is idle here
    finally:
        eng.shutdown()
