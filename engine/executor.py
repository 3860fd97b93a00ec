"""`TensorParallelExecutor`: rank 0's runner when the model is split across processes.

Each step it checks that the workers are alive, broadcasts the step's worker-side view
(`engine/distributed/step_message.py`), then runs its own `ModelRunner.execute`: the forward
pass (whose all-reduces the workers join) and sampling, which happens once, here, with the
requests' generators and grammar states that never leave rank 0.

Any failure of a step is fatal with more than one rank (`EngineFatalError`): the ranks may have
stopped at different collectives, and running on would pair the next step's all-reduces with
the last one's. The engine then fails every in-flight request and reports itself dead
(`AsyncEngine`), and the workers are told to exit.
"""
from __future__ import annotations

from engine.distributed.launcher import WorkerGroup
from engine.distributed.step_message import StepMessage
from engine.model_runner import ModelRunner
from engine.scheduler.output import SampledTokens, SchedulerOutput
from engine.step_failure import EngineFatalError


class TensorParallelExecutor:
    def __init__(self, runner: ModelRunner, workers: WorkerGroup):
        self.runner = runner
        self.workers = workers

    def __getattr__(self, name: str):  # kv_caches, block_tables, ...: the local runner's
        return getattr(self.runner, name)

    def execute(self, out: SchedulerOutput) -> SampledTokens:
        if self.workers.closed:
            raise EngineFatalError("the tensor-parallel workers were shut down")
        try:
            self.workers.check_alive()
            self.workers.comm.broadcast_object(StepMessage.of(out))
            return self.runner.execute(out)
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            self.workers.close()
            if isinstance(exc, EngineFatalError):
                raise
            raise EngineFatalError(f"tensor-parallel step failed: {exc!r}") from exc

    def close(self) -> None:
        self.workers.close()
