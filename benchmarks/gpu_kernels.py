"""Times the Triton kernels against their torch references and torch SDPA on one GPU.

    python -m benchmarks.gpu_kernels [--out benchmarks/out/gpu_kernels.json] [--quick]

Ceilings are measured first: a large device-to-device copy (bytes read + written per second)
for memory bandwidth, a large bf16 matmul for FLOP/s. Decode attention is reported in GB/s of
KV cache read, prefill in TFLOP/s of causal attention (multiply-adds counted as 2 FLOPs, masked
half skipped), fused ops in GB/s of bytes read + written. Each timing is the median of CUDA-event
measurements after warm-up. Every Triton result is checked against its reference once first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from engine.attention_metadata import AttentionMetadata
from engine.kernels import ops
from engine.kernels.torch_attention import TorchAttentionBackend
from engine.kernels.triton_attention import TritonAttentionBackend


@dataclass
class Result:
    name: str
    impl: str
    ms: float
    metric: str  # "GB/s" or "TFLOP/s"
    value: float
    fraction_of_ceiling: float
    max_abs_err: float | None = None


def time_ms(fn, warmup: int = 3, reps: int = 15) -> float:
    """Median milliseconds of fn() over reps CUDA-event measurements, after warmup calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings() -> dict:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far beyond L2
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=10)
    bandwidth = 2 * src.numel() / (ms * 1e-3)
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, reps=10)
    flops = 2 * n**3 / (ms * 1e-3)
    return {"bandwidth_GBps": bandwidth / 1e9, "bf16_matmul_TFLOPs": flops / 1e12}


def paged_batch(num_seqs, query_len, context, heads, kv_heads, head_dim, block_size, dtype):
    """Equal-length sequences with shuffled blocks; returns q, k, v, cache, meta."""
    per_seq = -(-context // block_size)
    num_blocks = num_seqs * per_seq + 1
    perm = (torch.randperm(num_blocks - 1) + 1).view(num_seqs, per_seq).tolist()
    meta = AttentionMetadata.build([query_len] * num_seqs, [context] * num_seqs, perm, block_size, "cuda")
    t = meta.num_tokens
    q = torch.randn(t, heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(t, kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(t, kv_heads, head_dim, device="cuda", dtype=dtype)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    return q, k, v, cache, meta


def sdpa_flash(q, k, v, causal):
    """q [B, H, Lq, D], k/v [B, KVH, Lk, D]; flash backend when it accepts the inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), "sdpa_flash"
    except RuntimeError:  # flash refuses GQA on some versions: expand heads instead
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal), "sdpa_flash_expanded"


def bench_decode(batch, context, ceil, heads=32, kv_heads=8, head_dim=128, block_size=16):
    q, k, v, cache, meta = paged_batch(batch, 1, context, heads, kv_heads, head_dim, block_size, torch.bfloat16)
    scale = head_dim**-0.5
    kv_bytes = 2 * batch * context * kv_heads * head_dim * cache.element_size()
    name = f"decode_b{batch}_ctx{context}"
    ref = TorchAttentionBackend().forward(q, k, v, cache, meta, scale).float()
    impls = {
        "triton": TritonAttentionBackend(),
        "triton_nosplit": TritonAttentionBackend(max_kv_splits=1),
        "torch_ref": TorchAttentionBackend(),
    }
    results = []
    for impl, backend in impls.items():
        out = backend.forward(q, k, v, cache, meta, scale)
        err = (out.float() - ref).abs().max().item()
        ms = time_ms(lambda: backend.forward(q, k, v, cache, meta, scale))
        gbps = kv_bytes / (ms * 1e-3) / 1e9
        results.append(Result(name, impl, ms, "GB/s", gbps, gbps / ceil["bandwidth_GBps"], err))
    # SDPA on the same data laid out densely (no paging): the bandwidth a dense kernel reaches
    kd = torch.randn(batch, kv_heads, context, head_dim, device="cuda", dtype=torch.bfloat16)
    vd = torch.randn_like(kd)
    qd = q.view(batch, heads, 1, head_dim)
    _, label = sdpa_flash(qd, kd, vd, causal=False)
    ms = time_ms(lambda: sdpa_flash(qd, kd, vd, causal=False))
    gbps = kv_bytes / (ms * 1e-3) / 1e9
    results.append(Result(name, label, ms, "GB/s", gbps, gbps / ceil["bandwidth_GBps"]))
    return results


def bench_prefill(batch, query_len, context, ceil, heads=32, kv_heads=8, head_dim=128, block_size=16):
    q, k, v, cache, meta = paged_batch(batch, query_len, context, heads, kv_heads, head_dim, block_size, torch.bfloat16)
    scale = head_dim**-0.5
    prefix = context - query_len
    # causal FLOPs: each query i attends prefix + i + 1 keys; QK^T and PV are 2 * D FLOPs each
    keys = batch * (query_len * prefix + query_len * (query_len + 1) / 2)
    flops = 4 * heads * head_dim * keys
    name = f"prefill_b{batch}_q{query_len}_ctx{context}"
    ref = TorchAttentionBackend().forward(q, k, v, cache, meta, scale).float()
    results = []
    for impl, backend in {"triton": TritonAttentionBackend(), "torch_ref": TorchAttentionBackend()}.items():
        out = backend.forward(q, k, v, cache, meta, scale)
        err = (out.float() - ref).abs().max().item()
        ms = time_ms(lambda: backend.forward(q, k, v, cache, meta, scale))
        tflops = flops / (ms * 1e-3) / 1e12
        results.append(Result(name, impl, ms, "TFLOP/s", tflops, tflops / ceil["bf16_matmul_TFLOPs"], err))
    if prefix == 0:
        qd = q.view(batch, query_len, heads, head_dim).transpose(1, 2)
        kd = k.view(batch, query_len, kv_heads, head_dim).transpose(1, 2)
        vd = v.view(batch, query_len, kv_heads, head_dim).transpose(1, 2)
        _, label = sdpa_flash(qd, kd, vd, causal=True)
        ms = time_ms(lambda: sdpa_flash(qd, kd, vd, causal=True))
        tflops = flops / (ms * 1e-3) / 1e12
        results.append(Result(name, label, ms, "TFLOP/s", tflops, tflops / ceil["bf16_matmul_TFLOPs"]))
    return results


def bench_ops(ceil, tokens=4096, hidden=2048, inter=8192, heads=32, kv_heads=8, head_dim=128):
    from engine.kernels import triton_ops

    dt = torch.bfloat16
    x = torch.randn(tokens, hidden, device="cuda", dtype=dt)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=dt)
    gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=dt)
    q = torch.randn(tokens, heads, head_dim, device="cuda", dtype=dt)
    k = torch.randn(tokens, kv_heads, head_dim, device="cuda", dtype=dt)
    ang = torch.rand(tokens, head_dim // 2, device="cuda")
    cos, sin = ang.cos(), ang.sin()
    e = x.element_size()
    cases = {
        # name: (triton fn, torch fn, bytes moved, output getter for the error check)
        "rms_norm_residual": (
            lambda: triton_ops.rms_norm(x, w, 1e-5, res), lambda: ops.rms_norm_torch(x, w, 1e-5, res),
            4 * x.numel() * e, lambda r: r[0],
        ),
        "silu_and_mul": (
            lambda: triton_ops.silu_and_mul(gate_up), lambda: ops.silu_and_mul_torch(gate_up),
            1.5 * gate_up.numel() * e, lambda r: r,
        ),
        "rotary": (
            lambda: triton_ops.apply_rotary(q, k, cos, sin), lambda: ops.apply_rotary_torch(q, k, cos, sin),
            2 * (q.numel() + k.numel()) * e + 2 * cos.numel() * 4, None,
        ),
    }
    results = []
    for name, (tri, ref, nbytes, pick) in cases.items():
        err = None
        if pick is not None:
            err = (pick(tri()).float() - pick(ref()).float()).abs().max().item()
        for impl, fn in (("triton", tri), ("torch_ref", ref)):
            ms = time_ms(fn)
            gbps = nbytes / (ms * 1e-3) / 1e9
            results.append(Result(f"{name}_{tokens}x{hidden if name != 'silu_and_mul' else inter}", impl, ms,
                                  "GB/s", gbps, gbps / ceil["bandwidth_GBps"], err if impl == "triton" else None))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/out"), "gpu_kernels.json"))
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernels: CUDA is not available; nothing to time")
        return 1
    torch.manual_seed(0)
    ceil = measure_ceilings()
    print(f"device {torch.cuda.get_device_name()}: copy {ceil['bandwidth_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    jobs = [
        ("decode", lambda: bench_decode(1, 8192, ceil)),
        ("decode", lambda: bench_decode(8, 4096, ceil)),
        ("decode", lambda: bench_decode(64, 1024, ceil)),
        ("decode", lambda: bench_decode(64, 4096, ceil)),
        ("decode", lambda: bench_decode(256, 1024, ceil)),
        ("decode", lambda: bench_decode(256, 2048, ceil)),
        ("prefill", lambda: bench_prefill(8, 1024, 1024, ceil)),
        ("prefill", lambda: bench_prefill(4, 512, 2560, ceil)),  # chunked prefill over a cached prefix
        ("ops", lambda: bench_ops(ceil)),
    ]
    if args.quick:
        jobs = [jobs[0], jobs[3], jobs[6], jobs[8]]
    results: list[Result] = []
    errors = []
    for kind, job in jobs:
        try:
            rs = job()
        except Exception as exc:  # keep going: one failing shape must not hide the rest
            traceback.print_exc()
            errors.append(f"{kind}: {exc!r}")
            continue
        for r in rs:
            err = "" if r.max_abs_err is None else f"  err {r.max_abs_err:.2e}"
            print(f"{r.name:28s} {r.impl:22s} {r.ms:9.3f} ms {r.value:9.1f} {r.metric:7s} "
                  f"({100 * r.fraction_of_ceiling:5.1f}% of ceiling){err}", flush=True)
        results.extend(rs)
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "ceilings": ceil, "results": [asdict(r) for r in results], "errors": errors}, f, indent=1)
    print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
