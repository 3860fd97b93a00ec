"""`--health-stall-seconds`: /health is liveness that notices a wedged engine, not only a dead one.

- `StepProgress` (fake clock, so every threshold is exact): an idle engine is never stalled,
  the stall clock starts when work arrives (not at the last step of an hour ago), a completed
  step resets it, 0 disables the check, and a submit racing the engine's idle check is kept.
- Over HTTP with two served models, one of whose steps blocks on an Event: /health and /ready
  answer 503 naming the stalled model once its step has blocked past the threshold (and the
  stall gauge says how long), 200 again once the step moves on; an idle engine left alone
  longer than the threshold stays 200; an engine thread that died answers 503 `failed`.
- Validation: a negative or non-numeric value is a clear error from the flag, the config file
  and `ServerSettings`.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from conveyor.cli import build_parser
from engine.async_engine import AsyncEngine
from engine.progress import StepProgress
from server.config_file import config_from_dict
from server.settings import ServerSettings
from tests.test_prod_harness import EchoEngine, ProdServer, echo_engine, smollm2_tokenizer

STALL = 1.0  # seconds; the blocked step is held well past it


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_idle_is_never_stalled_and_the_clock_starts_when_work_arrives():
    clock = FakeClock()
    p = StepProgress(clock)
    clock.now += 3600  # an hour idle
    idle = p.snapshot()
    assert (idle.pending, idle.stall_seconds, idle.last_step_age) == (False, 0.0, 3600.0)
    assert idle.stall_reason(60) is None
    p.work_arrived()
    assert p.snapshot().stall_seconds == 0.0  # not "an hour late"
    clock.now += 59
    assert p.snapshot().stall_reason(60) is None
    clock.now += 2
    late = p.snapshot()
    assert late.pending and late.stall_seconds == 61.0
    assert "61.0 s" in late.stall_reason(60) and late.stall_reason(0) is None  # 0: never
    p.work_arrived()  # more work while pending does not restart the clock
    assert p.snapshot().stall_seconds == 61.0
    p.step_completed()
    assert (p.snapshot().stall_seconds, p.snapshot().last_step_age) == (0.0, 0.0)
    clock.now += 10
    assert p.snapshot().stall_seconds == 10.0
    p.idle_if(lambda: False)  # a submit landed between the engine's check and this call: still pending
    assert p.snapshot().pending
    p.idle_if(lambda: True)
    clock.now += 1000
    after = p.snapshot()
    assert (after.pending, after.stall_seconds, after.last_step_age) == (False, 0.0, 1010.0)


class GatedEngine(EchoEngine):
    """An echo engine whose `step` waits while `gate` is clear (a wedged forward pass) and
    raises once `die` is set (an error outside the per-step recovery: the thread ends)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.die = False

    def step(self):
        self.entered.set()
        self.gate.wait(60)
        if self.die:
            raise RuntimeError("simulated fatal engine error")
        return super().step()


@pytest.fixture(scope="module")
def served():
    tok = smollm2_tokenizer()
    gated = GatedEngine(tok, "b")
    engine_b = AsyncEngine(engine_factory=lambda: gated)
    production = config_from_dict({"models": [{"name": "a"}, {"name": "b"}]})
    srv = ProdServer(echo_engine("a"), production, engines={"b": engine_b},
                     settings=ServerSettings(health_stall_seconds=STALL)).start()
    yield srv, gated
    gated.gate.set()
    srv.stop()


def _complete(srv: ProdServer, model: str) -> httpx.Response:
    return httpx.post(srv.base_url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": "hi there", "max_tokens": 2})


def test_idle_engines_past_the_threshold_are_alive(served):
    srv, _ = served
    assert _complete(srv, "b").status_code == 200
    time.sleep(STALL * 1.5)  # no work: however long, never stalled
    health = httpx.get(srv.base_url + "/health", timeout=10)
    assert health.status_code == 200, health.json()
    assert health.json() == {"status": "ok", "models": [{"name": "a", "state": "ready"},
                                                         {"name": "b", "state": "ready"}]}
    assert srv.metric("conveyor_engine_stall_seconds", model_name="b") == 0.0
    assert srv.metric("conveyor_engine_last_step_age_seconds", model_name="b") >= STALL


def test_a_blocked_step_turns_health_503_naming_the_model_until_it_moves_on(served):
    srv, gated = served
    gated.entered.clear()
    gated.gate.clear()
    result: list[httpx.Response] = []
    client = threading.Thread(target=lambda: result.append(_complete(srv, "b")))
    sent_at = time.monotonic()  # the stall clock starts after this: the request arrives later
    client.start()
    assert gated.entered.wait(30)
    deadline = time.monotonic() + 30
    while (health := httpx.get(srv.base_url + "/health", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "never reported stalled"
        time.sleep(0.05)
    assert time.monotonic() - sent_at > STALL  # not before the threshold
    body = health.json()
    assert health.status_code == 503 and body["status"] == "stalled"
    a, b = body["models"]
    assert a == {"name": "a", "state": "ready"}  # the other model is fine: only b is named
    assert b["name"] == "b" and b["state"] == "stalled" and "no engine step has completed" in b["reason"]
    ready = httpx.get(srv.base_url + "/ready", timeout=10)
    assert ready.status_code == 503 and "model b is stalled" in ready.json()["reasons"]
    assert srv.metric("conveyor_engine_stall_seconds", model_name="b") > STALL
    assert srv.metric("conveyor_engine_stall_seconds", model_name="a") == 0.0

    gated.gate.set()  # the step moves on
    client.join(30)
    assert result and result[0].status_code == 200
    health = httpx.get(srv.base_url + "/health", timeout=10)
    assert health.status_code == 200, health.json()
    assert httpx.get(srv.base_url + "/ready", timeout=10).status_code == 200


def test_a_dead_engine_thread_is_503_failed(served):
    srv, gated = served
    gated.die = True
    assert _complete(srv, "b").status_code >= 500  # the step raises: the engine thread ends
    health = httpx.get(srv.base_url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert health.json()["models"][1] == {"name": "b", "state": "failed", "reason": "the engine thread stopped"}


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan", "soon"])
def test_the_flag_refuses_bad_values(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--health-stall-seconds", value])
    assert exit_info.value.code == 2
    assert "argument --health-stall-seconds" in capsys.readouterr().err


def test_the_flag_config_key_and_settings():
    assert build_parser().parse_args(["serve"]).health_stall_seconds is None  # the config or 120 decides
    assert build_parser().parse_args(["serve", "--health-stall-seconds", "0"]).health_stall_seconds == 0.0
    assert ServerSettings().health_stall_seconds == 120.0
    assert config_from_dict({"health_stall_seconds": 120}).health_stall_seconds == 120.0
    with pytest.raises(ValueError, match="health_stall_seconds must be >= 0"):
        config_from_dict({"health_stall_seconds": -1})
    with pytest.raises(ValueError, match="health_stall_seconds must be of type float"):
        config_from_dict({"health_stall_seconds": "60s"})
    with pytest.raises(ValueError, match="health_stall_seconds must be >= 0 seconds"):
        ServerSettings(health_stall_seconds=-1)
