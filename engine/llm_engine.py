"""`LLMEngine`: step-level control over generation.

``add_request`` queues work, ``step`` runs one scheduled forward pass and returns the outputs of
requests that progressed, ``abort_request`` stops requests. The engine is single-threaded; the
asyncio front (`AsyncEngine`) drives it from its own thread. Requests are checked and built by
`RequestBuilder` (engine/request_builder.py); adapters are kept by `EngineAdapters`
(engine/lora/engine_adapters.py).

A step is ``Scheduler.schedule`` -> ``ModelRunner.execute`` -> ``Scheduler.update_from_output``
-> ``OutputProcessor.process`` (docs/architecture.md). If the runner or the update raises, only
that step's requests fail (engine/step_failure.py). With ``CONVEYOR_DEBUG=1`` in the environment
the full ``check_integrity`` runs after every step; otherwise an O(1) check runs each time the
engine becomes idle.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable

from engine.config import EngineConfig
from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.lora.engine_adapters import EngineAdapters
from engine.lora.request import LoRARequest
from engine.distributed.launcher import WorkerGroup
from engine.executor import TensorParallelExecutor
from engine.model_runner import ModelRunner
from engine.models.tensor_parallel import TPContext
from engine.models.loader import load_hf_config, load_model, load_tokenizer, resolve_dtype, resolve_model
from engine.output_processor import OutputProcessor
from engine.pooling import PoolingParams
from engine.outputs import EngineStats, RequestOutput
from engine.request import Request, RequestStatus
from engine.request_builder import RequestBuilder
from engine.sampler import Sampler
from engine.generation_config import load_generation_defaults
from engine.sampling_params import SamplingParams
from engine.scheduler.output import SampledTokens, SchedulerOutput
from engine.scheduler.policies import make_policy
from engine.scheduler.scheduler import Scheduler, SchedulerConfig
from engine.startup import choose_num_blocks, configure_threads, eos_token_ids, resolve_device
from engine.step_failure import StepFailures
from engine.structured_output.manager import StructuredOutputManager

# Decode graphs are captured up to this batch; larger decode steps run eagerly. On an H200
# (benchmarks/RESULTS.md) graphs gave 5.7x at batch 1 and 3.1x at batch 64, but a captured
# batch of 256 ran at half the eager speed, for reasons not yet understood.
MAX_GRAPH_BATCH = 128


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        configure_threads(config.num_threads, self.device)
        # Tensor parallel: the workers start first, so they load their shards while we load ours.
        self.workers = WorkerGroup.start(config, self.device) if config.tensor_parallel_size > 1 else None
        if self.workers is not None:
            self.device = self.workers.device
        source = resolve_model(config.model)
        self.hf_config = load_hf_config(source)
        self.sampling_defaults = load_generation_defaults(source, config.generation_config)
        self.tokenizer = self._load_tokenizer(source)
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        self.model = load_model(
            source, self.hf_config, self.dtype, self.device,
            attention_backend=config.attention_backend, load_format=config.load_format, seed=config.seed,
            tp=self.workers.comm.tp_context() if self.workers is not None else TPContext(),
            linear_backend=config.linear_backend,
        )
        self.model_name = config.model or "SmolLM2-135M-Instruct"
        self.adapters = EngineAdapters.build(config, self.model, self.hf_config, self.dtype, self.device)
        self.lora = self.adapters.manager  # LoRAManager or None; it wrapped the model's projections
        self.max_model_len = min(config.max_model_len or self.model.max_model_len, self.model.max_model_len)
        block_size = config.block_size
        bytes_per_block = ModelRunner.kv_bytes_per_block(self.model, block_size, self.dtype)
        self.num_blocks = choose_num_blocks(config, bytes_per_block, self.device)
        if self.workers is not None:  # every rank's cache has the same number of blocks
            self.num_blocks = self.workers.comm.min_int(self.num_blocks)
        self.kv = KVCacheManager(self.num_blocks, block_size, config.enable_prefix_caching)
        self.policy = make_policy(config.scheduling_policy)
        self.eos_token_ids = eos_token_ids(self.hf_config, self.tokenizer)
        sched_config = SchedulerConfig(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            static_batching=config.static_batching,
            eos_token_ids=frozenset(self.eos_token_ids),
            max_loras=config.max_loras if config.enable_lora else 0,
        )
        self.scheduler = Scheduler(sched_config, self.kv, self.policy)
        use_graphs = (self.device.type == "cuda" and not config.enforce_eager and self.workers is None
                      and not config.enable_lora  # the LoRA layers' step mapping is not captured
                      and config.attention_backend in ("auto", "triton"))
        self.runner = ModelRunner(self.model, self.num_blocks, block_size, self.device, self.dtype,
                                  Sampler(self.eos_token_ids),
                                  cuda_graph_batch=min(config.max_num_seqs, MAX_GRAPH_BATCH) if use_graphs else 0,
                                  max_model_len=self.max_model_len, lora=self.lora)
        if self.workers is not None:  # broadcasts each step to the workers, then runs ours
            self.runner = TensorParallelExecutor(self.runner, self.workers)
        self.outputs = OutputProcessor(self.tokenizer)
        self.builder = RequestBuilder(self.tokenizer, self.hf_config.vocab_size, self.max_model_len,
                                      self.num_blocks * block_size, self.device, self.sampling_defaults, config)
        self.structured = StructuredOutputManager(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)
        self._pending: list[RequestOutput] = []  # outputs to hand out on the next step (aborts)
        self.stats = EngineStats(num_blocks=self.num_blocks, block_size=block_size,
                                 max_loras=config.max_loras if config.enable_lora else 0,
                                 dtype=str(self.dtype).removeprefix("torch."),
                                 linear_backend=self.model.linear_backend,
                                 attention_backend=self.model.attention_backend)
        self.debug = os.environ.get("CONVEYOR_DEBUG", "") == "1"  # full integrity check every step
        self.failures = StepFailures(self.scheduler, self.outputs, self.check_integrity)

    def close(self) -> None:
        """Stops the tensor-parallel workers (nothing to do with one process). The engine
        cannot step afterwards."""
        if self.workers is not None:
            self.workers.close()

    def _load_tokenizer(self, source):
        try:
            return load_tokenizer(source, self.config.tokenizer)
        except Exception:
            if self.config.load_format == "dummy":  # benchmarks on a bare config.json: ids only
                return None
            raise

    # -- requests -----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | PoolingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        tenant: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queues a request. Raises ValueError (naming the problem) if it can never run. With
        `PoolingParams` it is an embedding request: its final output carries ``embedding``.
        ``lora_request`` runs it with that loaded adapter (found by ``lora_name``; `LoRAError`
        with param "model" when none of that name is loaded)."""
        lora = self.adapters.resolve(lora_request)
        where = {"groups": self.outputs, "live": self.scheduler.requests}
        if isinstance(params, PoolingParams):  # an embedding request: prefill only, then it finishes
            prompt_text, request = self.builder.pooling(request_id, prompt, params, arrival_time, priority,
                                                        cache_salt, tenant, lora, **where)
            self.outputs.add(request_id, prompt_text, [request], request.arrival_time)
            self.scheduler.add_request(request)
            return
        prompt_text, children = self.builder.generation(request_id, prompt, params, arrival_time, priority,
                                                        cache_salt, tenant, lora, **where)
        grammar = children[0].sampling_params.structured_outputs
        self.structured.attach(grammar, children)  # compiles off the step loop
        self.outputs.add(request_id, prompt_text, children, children[0].arrival_time)
        for child in children:
            self.scheduler.add_request(child)

    # -- LoRA adapters ------------------------------------------------------------------------
    def add_lora(self, lora: LoRARequest) -> None:
        """Loads an adapter into CPU memory after validating it (`LoRAError` naming the field
        otherwise). Loading a name again from the same path is a no-op; from another path it is
        refused. It reaches a device slot when a step first needs it."""
        self.adapters.add(lora)

    def remove_lora(self, lora_name: str) -> bool:
        """Unloads an adapter: new requests naming it are refused at once; requests already
        queued or running on it finish on it, then its weights are freed. False if unknown."""
        return self.adapters.remove(lora_name, self.scheduler.requests.values())

    def list_loras(self) -> list[LoRARequest]:
        """The loaded adapters, in load order."""
        return self.adapters.list()

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stops the requests (unknown or finished ids are ignored); their blocks are freed at
        once and a final output with finish_reason "abort" comes out of the next ``step``."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            children = self.outputs.children(rid)
            for child in children:
                self.scheduler.finish_request(child, RequestStatus.FINISHED_ABORTED)
            if children:
                group = self.outputs.group_of(children[0])
                self._pending.append(self.outputs.make_output(group, time.time()))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one step; returns an output for every request that progressed or ended. Raises
        `EngineFatalError` only when the engine cannot continue."""
        results, self._pending = self._pending, []
        self.adapters.purge(self.scheduler.requests.values())  # unloaded adapters whose last request left
        if self.structured.has_pending:
            results.extend(self._fail_bad_grammars())
        p0 = time.perf_counter()  # p0..p3: the step's phases, for the schedule/execute split
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return results
        t0 = time.time()
        self.outputs.mark_scheduled(sched.scheduled, t0)
        try:
            p1 = time.perf_counter()
            sampled = self.runner.execute(sched)
            p2 = time.perf_counter()
            requests = [self.scheduler.requests[rid] for rid in sampled.request_ids]
            finished = self.scheduler.update_from_output(sched, sampled)
            p3 = time.perf_counter()
            now = time.time()
            self.outputs.process(requests, now, self.scheduler.finish_request, results)
            results.extend(self._pooled_outputs(finished, now))
        except Exception as exc:  # noqa: BLE001 - any failure of the step fails its requests only
            results.extend(self.failures.fail(sched, exc))
            return results
        self.failures.succeeded()
        self._update_stats(sched, sampled, requests, now - t0, [r for r in finished if r.pooling is not None])
        s = self.stats  # Python scheduling (schedule + update_from_output) vs the model, vs outputs
        s.last_schedule_time, s.last_execute_time = (p1 - p0) + (p3 - p2), p2 - p1
        s.last_output_time = time.perf_counter() - p3
        self._check_after_step()
        return results

    def _pooled_outputs(self, finished: list[Request], now: float) -> list[RequestOutput]:
        """The final outputs of the embedding requests that finished this step."""
        outs = []
        for request in finished:
            if request.pooling is not None:
                out = self.outputs.make_output(self.outputs.group_of(request), now)
                out.embedding = request.pooling.result()
                out.metrics.first_token_time = now
                outs.append(out)
        return outs

    def _fail_bad_grammars(self) -> list[RequestOutput]:
        """Ends, with an error output, requests whose structured-output grammar failed to
        compile after they were queued (they were never scheduled)."""
        failed, now = [], time.time()
        for seq, message in self.structured.take_failed():
            if seq.status.finished:  # a sibling of an n > 1 request already ended it
                continue
            group = self.outputs.group_of(seq)
            for sibling in group.seqs:
                self.scheduler.finish_request(sibling.request, RequestStatus.FINISHED_ERROR)
            failed.append(self.outputs.fail(group, message, now))
        return failed

    def _check_after_step(self) -> None:
        if self.debug:
            self.check_integrity()
        elif not self.scheduler.has_unfinished():  # just became idle: the O(1) check
            self.scheduler.check_idle()
            assert not len(self.outputs), "output groups left at idle"

    def _update_stats(self, sched: SchedulerOutput, sampled: SampledTokens, requests: list[Request],
                      elapsed: float, pooled: list[Request]) -> None:
        s = self.stats
        s.num_steps += 1
        s.last_step_time = elapsed
        s.last_batch_size = len(sched.scheduled)
        s.last_batch_tokens = sched.num_batched_tokens
        s.generation_tokens += len(sampled.request_ids)
        s.prompt_tokens += sum(r.num_prompt_tokens for r in requests if r.num_output_tokens == 1)
        s.prompt_tokens += sum(r.num_prompt_tokens for r in pooled)

    def get_stats(self) -> EngineStats:
        s = self.stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = self.scheduler.num_waiting
        s.num_waiting_tokens = sum(r.num_tokens for r in self.scheduler.waiting_requests())
        s.kv_cache_usage = self.kv.usage
        s.prefix_cache_queries = self.kv.prefix_cache_queries
        s.prefix_cache_hits = self.kv.prefix_cache_hits
        s.num_preemptions = self.scheduler.num_preemptions
        if self.lora is not None:
            s.running_lora_adapters = self.adapters.names(self.scheduler.running)
            s.waiting_lora_adapters = self.adapters.names(self.scheduler.waiting_requests())
        return s

    def check_integrity(self) -> None:
        """Raises AssertionError if the scheduler, the KV cache and the output processor
        disagree (see `Scheduler.check_integrity`). O(blocks + requests)."""
        self.scheduler.check_integrity()
        self.outputs.check_integrity(set(self.scheduler.requests))
