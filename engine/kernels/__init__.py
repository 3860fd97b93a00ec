"""Compute kernels. Each op has a plain-torch implementation (the reference, and the CPU path)
and, where it pays, a Triton kernel used on CUDA. `ops.py` dispatches; `backend.py` picks the
attention backend."""
