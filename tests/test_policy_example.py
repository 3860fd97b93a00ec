"""The worked example policy of docs/scheduling.md: the docs show exactly the code that runs, it
is short, and it changes admission and preemption order through the real scheduler as the docs
say."""
import inspect
import re
from pathlib import Path

from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import examples
from engine.scheduler.examples import EarliestDeadlinePolicy
from engine.scheduler.output import SampledTokens
from engine.scheduler.policies import make_policy
from engine.scheduler.scheduler import Scheduler, SchedulerConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "scheduling.md"


def make_request(rid, prompt_len, max_tokens, priority, arrival):
    return Request(rid, list(range(7 * len(rid), 7 * len(rid) + prompt_len)), SamplingParams(max_tokens=max_tokens),
                   max_tokens, arrival, priority)


def build(policy, num_blocks=100, max_seqs=8, budget=1000, now=100.0):
    kv = KVCacheManager(num_blocks, 4)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(cfg, kv, make_policy(policy), clock=lambda: now)


def test_docs_show_the_example_verbatim_and_it_is_short():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    source = Path(examples.__file__).read_text()
    assert source in blocks, "docs/scheduling.md must embed engine/scheduler/examples.py verbatim"
    assert len(inspect.getsource(EarliestDeadlinePolicy).splitlines()) < 30


def test_example_selectable_by_import_path():
    policy = make_policy("engine.scheduler.examples:EarliestDeadlinePolicy")
    assert isinstance(policy, EarliestDeadlinePolicy)


def test_tight_deadline_admitted_before_earlier_arrival():
    # "batch" arrives first (deadline 0 + 30 s), "chat" later (deadline 5 + 1 s): EDF runs chat
    # first, FCFS runs batch first. One seat makes the order visible.
    order = {}
    for name in ("fcfs", EarliestDeadlinePolicy):
        sched = build(name, max_seqs=1)
        sched.add_request(make_request("batch", 9, 3, priority=1, arrival=0.0))
        sched.add_request(make_request("chat", 9, 3, priority=0, arrival=5.0))
        order[name] = [s.request_id for s in sched.schedule().scheduled]
    assert order["fcfs"] == ["batch"]
    assert order[EarliestDeadlinePolicy] == ["chat"]


def test_unlisted_priority_uses_default_target():
    policy = EarliestDeadlinePolicy(targets_s={0: 2.0}, default_s=50.0)
    assert policy.deadline(make_request("x", 3, 1, priority=7, arrival=10.0)) == 60.0
    assert policy.deadline(make_request("y", 3, 1, priority=0, arrival=10.0)) == 12.0


def test_latest_deadline_preempted_when_blocks_run_out():
    # Two running requests fill 4-token blocks; growing them forces one preemption. EDF must
    # evict the batch request (later deadline) even though it arrived first; FCFS evicts the
    # newest (chat).
    victims = {}
    for name in ("fcfs", EarliestDeadlinePolicy):
        sched = build(name, num_blocks=4, max_seqs=2)
        batch = make_request("batch", 8, 8, priority=1, arrival=0.0)
        chat = make_request("chat", 8, 8, priority=0, arrival=1.0)
        sched.add_request(batch)
        sched.add_request(chat)
        preempted = []
        for _ in range(4):
            out = sched.schedule()
            preempted += out.preempted_ids
            sampling = [s.request_id for s in out.scheduled if s.sample]
            sched.update_from_output(out, SampledTokens(sampling, [1] * len(sampling)))
            if preempted:
                break
        victims[name] = preempted[:1]
        sched.check_integrity()
    assert victims["fcfs"] == ["chat"]
    assert victims[EarliestDeadlinePolicy] == ["batch"]
