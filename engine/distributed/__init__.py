"""Tensor parallelism across processes on `torch.distributed` (docs/scaling.md).

- `process_group`: where this process stands (torchrun's environment, or ranks the engine
  spawned itself) and the process groups built from it.
- `communicator`: the few collectives the engine uses (step broadcast, all-reduce).
- `step_message`: the worker-side view of one step, the one message rank 0 sends per step.
- `launcher`: rank 0 spawning and watching local worker processes.
- `worker`: the loop a rank other than 0 runs.
"""
