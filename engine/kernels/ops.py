"""Small fused ops used by the models. Each function has a plain-torch body (the reference, and
the fallback); on CUDA tensors it dispatches to the Triton kernel in `triton_ops.py` when Triton
imports, on float32/bfloat16 CPU tensors to the C++ kernels of `csrc/fused_ops.cpp` when the CPU
extension builds (`cpu_extension.cpu_ops_available`).

Guarantees: the result is the same math whichever path runs, with the same rounding points. The
C++ RMSNorm (with its residual add) and rotary are bit-identical to the torch bodies on an AVX2
host (tested); SiLU differs in the last bits only (its exp).
"""
from __future__ import annotations

import functools

import torch

from engine.kernels import cpu_extension
from engine.kernels.optional_triton import triton_module

_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _triton_ops():
    return triton_module("triton_ops")


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_ops() is not None


def _use_cpu_kernel(*tensors: torch.Tensor) -> bool:
    """The C++ kernels take CPU tensors of one supported dtype, and have no autograd formula."""
    x = tensors[0]
    if not x.is_cpu or x.dtype not in _CPU_KERNEL_DTYPES:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a loop, not any(): this runs ~40 times per decode step
        if t.dtype != x.dtype or (grad and t.requires_grad):
            return False
    return cpu_extension.cpu_ops_available()


@functools.lru_cache(maxsize=1)
def _torch_float_lanes() -> int:
    """Floats per torch CPU vector (Vectorized<float>): the C++ RMSNorm sums the squares in the
    order of torch's sum kernel, which depends on it (16 with AVX-512 kernels, 8 with AVX2). On
    other ISAs 8 may not be torch's width: the sums then differ from torch's in the last bits."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rmsnorm(x + residual) * weight, x + residual). With residual None, the second
    value is x itself. Statistics are computed in float32."""
    if _use_triton(x):
        return _triton_ops().rms_norm(x, weight, eps, residual)
    if residual is None:
        if x.is_contiguous() and weight.is_contiguous() and _use_cpu_kernel(x, weight):
            return torch.ops.conveyor_cpu.rms_norm(x, weight, eps, _torch_float_lanes()), x
    elif (x.is_contiguous() and weight.is_contiguous() and residual.is_contiguous()
          and _use_cpu_kernel(x, weight, residual)):
        return torch.ops.conveyor_cpu.add_rms_norm(x, residual, weight, eps, _torch_float_lanes())
    return rms_norm_torch(x, weight, eps, residual)


def rms_norm_torch(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
    # Normalise in float32, round to the model dtype, then scale: the rounding points of the
    # reference implementations (and of the Triton kernel). F.rms_norm fuses the statistics.
    normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return normed.to(x.dtype) * weight, x


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates q [T, H, D] and k [T, KVH, D] in place, NeoX layout (first half / second half of
    the rotary dims). cos, sin: [T, rotary_dim // 2]. Dims past rotary_dim are left as they are."""
    if _use_triton(q):
        _triton_ops().apply_rotary(q, k, cos, sin)
        return
    # q and k are usually views into the fused QKV output: the kernel takes any token and head
    # strides, only the dims must be contiguous.
    layout_ok = q.stride(-1) == 1 and k.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    if layout_ok and cos.dtype == sin.dtype == torch.float32 and _use_cpu_kernel(q, k):
        torch.ops.conveyor_cpu.rotary_(q, k, cos, sin)
        return
    apply_rotary_torch(q, k, cos, sin)


def apply_rotary_torch(q, k, cos, sin) -> None:
    # In the model's dtype, like the reference implementations: converting every q/k element
    # to float32 and back costs more than the rotation itself on CPU.
    half = cos.shape[-1]
    c = cos[:, None, :].to(q.dtype)
    s = sin[:, None, :].to(q.dtype)
    for t in (q, k):
        x1 = t[..., :half]
        x2 = t[..., half : 2 * half]
        r1 = x1 * c - x2 * s
        t[..., half : 2 * half] = x2 * c + x1 * s
        t[..., :half] = r1


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * I] holding gate then up; returns silu(gate) * up, shape [..., I]."""
    if _use_triton(x):
        return _triton_ops().silu_and_mul(x)
    if x.is_contiguous() and _use_cpu_kernel(x):
        return torch.ops.conveyor_cpu.silu_and_mul(x)
    return silu_and_mul_torch(x)


def silu_and_mul_torch(x):
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
