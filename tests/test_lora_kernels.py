"""The multi-LoRA kernels (engine/kernels/lora_ops.py, triton_lora.py) against a naive
per-token float64 reference.

Cases cover what the engine feeds them: several adapters of different ranks zero-padded to the
slot rank, tokens with no adapter (slot -1, whose rows must stay bit-identical), slots in any
order and contiguous runs, an output that is a column slice of a fused QKV tensor, odd token
counts and dims, an empty slot (scaling 0). The Triton kernels run on CPU under Triton's
interpreter (conftest sets TRITON_INTERPRET=1 before triton is imported), on small shapes; with
CUDA they compile for real and also run in float16/bfloat16.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from engine.kernels import lora_ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (max-abs, relative-norm) error allowed against the float64 reference fed the same inputs
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 4e-3), torch.bfloat16: (1e-1, 2e-2)}


@dataclass(frozen=True)
class Case:
    slots: tuple[int, ...]  # token -> slot, -1 = base model
    in_dim: int
    out_dim: int
    ranks: tuple[int, ...]  # true rank per slot; slot rank R = max; 0 = empty slot
    fused_offset: int = 0  # y is y_full[:, off:off + out] of a wider tensor when > 0


CASES = {
    "decode_mixed": Case((0, -1, 2, 1, 2, -1, 0), 40, 24, (8, 4, 2)),
    "prefill_runs": Case((1,) * 9 + (-1,) * 4 + (0,) * 6, 33, 17, (4, 8)),
    "interleaved_odd": Case((2, 0, 2, 0, -1, 2, 1), 19, 45, (3, 5, 7), fused_offset=11),
    "one_slot_all": Case((3,) * 5, 64, 32, (0, 0, 0, 16)),
    "all_base": Case((-1,) * 4, 16, 16, (8, 8)),
    "empty_slot_used": Case((0, 1, 1), 16, 20, (0, 4)),  # slot 0 empty: scaling 0, zero weights
    # slots 1 and 2 of 4 in use: a run of slots, the weights are a view
    "slot_run": Case((2, 1, -1, 2, 1), 24, 16, (4, 4, 8, 4)),
    # slots 1 and 3 of 4 in use (the padded layout gathers their weights), a padded short slot
    "gap_slots": Case((3, 1, 3, 1, -1, 3), 20, 12, (4, 6, 2, 4)),
    # every token on an adapter, output a column slice: the padded path's slice-add scatter
    "all_lora_fused": Case((1, 0, 2, 0, 1, 2, 2), 20, 28, (4, 8, 6), fused_offset=7),
    # one long prefill next to two decodes: too unbalanced for the padded layout
    "unbalanced": Case((1,) + (0,) * 20 + (2, -1), 16, 24, (4, 8, 2)),
    # > 256 tokens (the 64-row tiles) and rank > 64 (several rank tiles), in a repeating pattern
    "many_tokens_big_rank": Case((0, 0, 1, -1, 1, 0, 1) * 43, 24, 20, (80, 3), fused_offset=5),
}


def make_inputs(case: Case, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_slots, rank = len(case.ranks), max(max(case.ranks), 1)
    num_tokens = len(case.slots)
    a = torch.zeros(num_slots, rank, case.in_dim)
    b = torch.zeros(num_slots, case.out_dim, rank)
    scaling = torch.zeros(num_slots)
    for s, r in enumerate(case.ranks):
        if r:
            a[s, :r] = torch.randn(r, case.in_dim, generator=g) / case.in_dim**0.5
            b[s, :, :r] = torch.randn(case.out_dim, r, generator=g)
            scaling[s] = 16.0 / r
    x = torch.randn(num_tokens, case.in_dim, generator=g)
    y_full = torch.randn(num_tokens, case.out_dim + 2 * case.fused_offset, generator=g)
    slots = torch.tensor(case.slots, dtype=torch.int64)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (y_full.to(device=device, dtype=dtype), cast(x), cast(a), cast(b), slots.to(device),
            scaling.to(device))


def y_view(case: Case, y_full: torch.Tensor) -> torch.Tensor:
    return y_full[:, case.fused_offset:case.fused_offset + case.out_dim]


def naive_reference(y, x, a, b, slots, scaling) -> torch.Tensor:
    """Per-token float64 loop: the definition of the operation."""
    out = y.double().clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            out[t] += scaling[s].double() * (b[s].double() @ (a[s].double() @ x[t].double()))
    return out


def assert_close(actual, expected, dtype):
    max_abs, rel = TOLERANCE[dtype]
    err = (actual.double() - expected).abs()
    assert err.max().item() <= max_abs * max(1.0, expected.abs().max().item()), err.max().item()
    assert (err.norm() / expected.norm().clamp_min(1e-12)).item() <= rel


def check(case: Case, impl, dtype=torch.float32, device=DEVICE):
    y_full, x, a, b, slots, scaling = make_inputs(case, dtype, device)
    before = y_full.clone()
    expected = naive_reference(y_view(case, y_full), x, a, b, slots, scaling)
    impl(y_view(case, y_full), x, a, b, slots, scaling)
    assert_close(y_view(case, y_full), expected, dtype)
    base_rows = slots.cpu() < 0
    # rows of slot -1 and the columns outside the slice are untouched, bit for bit
    assert torch.equal(y_full[base_rows.to(y_full.device)], before[base_rows.to(y_full.device)])
    off, out = case.fused_offset, case.out_dim
    assert torch.equal(y_full[:, :off], before[:, :off])
    assert torch.equal(y_full[:, off + out:], before[:, off + out:])


def with_mapping(impl):
    """impl called with the step's LoRAMapping instead of the raw token_slots tensor."""
    def call(y, x, a, b, slots, scaling):
        impl(y, x, a, b, lora_ops.lora_mapping(slots, a.shape[0]), scaling)
    return call


@pytest.mark.parametrize("slots_as", ["tensor", "mapping"])
@pytest.mark.parametrize("name", CASES)
def test_torch_path_matches_naive_reference(name, slots_as):
    impl = lora_ops.add_lora_torch if slots_as == "tensor" else with_mapping(lora_ops.add_lora_torch)
    check(CASES[name], impl, device="cpu")


def test_mapping_picks_padded_bmm_only_for_balanced_slots():
    def padded(name):
        return lora_ops.lora_mapping(torch.tensor(CASES[name].slots), len(CASES[name].ranks)).padded
    assert padded("decode_mixed").row_mask is not None and padded("decode_mixed").present is None
    assert padded("gap_slots").present.tolist() == [1, 3] and padded("gap_slots").max_rows == 3
    assert padded("slot_run").present == slice(1, 3) and padded("interleaved_odd").present is None
    assert padded("many_tokens_big_rank").row_mask is None  # 129 tokens each: nothing padded
    assert padded("all_lora_fused").lora_rows == slice(0, 7)
    assert padded("decode_mixed").lora_rows.tolist() == [0, 2, 3, 4, 6]  # not a slice: tokens 1, 5 are base
    layout = padded("gap_slots")  # rows: slot 1 -> tokens 1, 3, pad; slot 3 -> tokens 0, 2, 5
    assert layout.gather[layout.inverse].tolist() == [0, 1, 2, 3, 5]
    assert padded("unbalanced") is None and padded("one_slot_all") is None and padded("all_base") is None
    with pytest.raises(ValueError, match="slot 5"):
        lora_ops.lora_mapping(torch.tensor([0, 5]), 2)


@pytest.mark.parametrize("slots_dtype", [torch.int32, torch.int64])
def test_add_lora_dispatch_and_int32_slots(slots_dtype):
    case = CASES["interleaved_odd"]

    def impl(y, x, a, b, slots, scaling):
        lora_ops.add_lora(y, x, a, b, slots.to(slots_dtype), scaling)

    check(case, impl)


def test_slot_groups_slices_contiguous_runs_and_indexes_the_rest():
    groups = lora_ops.slot_groups(torch.tensor([2, 2, -1, 0, 0, 0, 1, 2]))
    assert [s for s, _ in groups] == [0, 1, 2]
    assert groups[0][1] == slice(3, 6) and groups[1][1] == slice(6, 7)
    assert groups[2][1].tolist() == [0, 1, 7]
    assert lora_ops.slot_groups(torch.tensor([-1, -1])) == []


def test_bad_shapes_name_the_argument():
    y_full, x, a, b, slots, scaling = make_inputs(CASES["decode_mixed"])
    with pytest.raises(ValueError, match="lora_b"):
        lora_ops.add_lora(y_full[:, :20], x, a, b, slots, scaling)  # y narrower than lora_b's out
    with pytest.raises(ValueError, match="token_slots"):
        lora_ops.add_lora(y_full, x, a, b, slots[:-1], scaling)
    with pytest.raises(ValueError, match="scaling"):
        lora_ops.add_lora(y_full, x, a, b, slots, scaling[:1])


# float16 also runs under the interpreter (it exercises the kernels' casts); bfloat16 only on
# CUDA: the Triton 3.9 interpreter's tl.dot returns garbage for bf16 inputs (a plain 16x16
# bf16 dot is off by 1e10 there, while the same kernel is exact in fp16)
TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]


@pytest.fixture
def triton_lora():
    """The Triton module; only its own tests skip when Triton is not installed."""
    return pytest.importorskip("engine.kernels.triton_lora", reason="Triton is not installed")


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_triton_add_lora_matches_reference_and_torch_path(triton_lora, name, dtype):
    case = CASES[name]
    check(case, triton_lora.add_lora, dtype)
    check(case, with_mapping(triton_lora.add_lora), dtype)
    # and the torch path on the same inputs and device (it runs anywhere)
    y_full, x, a, b, slots, scaling = make_inputs(case, dtype)
    y_torch = y_full.clone()
    triton_lora.add_lora(y_view(case, y_full), x, a, b, slots, scaling)
    lora_ops.add_lora_torch(y_view(case, y_torch), x, a, b, slots, scaling)
    assert_close(y_full, y_torch.double(), dtype)


def test_triton_shrink_and_expand_separately(triton_lora):
    case = CASES["interleaved_odd"]
    y_full, x, a, b, slots, scaling = make_inputs(case)
    v = triton_lora.lora_shrink(x, a, slots)
    expected_v = torch.zeros(v.shape, dtype=torch.float64)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expected_v[t] = a[s].double() @ x[t].double()
    assert v.dtype == torch.float32 and v.shape == (len(case.slots), a.shape[1])
    assert_close(v.cpu(), expected_v, torch.float32)  # slot -1 rows are exactly zero
    assert torch.equal(v[slots < 0], torch.zeros_like(v[slots < 0]))
    expected = naive_reference(y_view(case, y_full), x, a, b, slots, scaling)
    triton_lora.lora_expand(y_view(case, y_full), v, b, slots, scaling)
    assert_close(y_view(case, y_full).cpu(), expected.cpu(), torch.float32)


def test_segments_group_tokens_by_slot_without_slot_minus_one(triton_lora):
    seg = triton_lora.make_segments(torch.tensor([2, -1, 0, 2, 0, -1, 2], device=DEVICE), 4)
    assert seg.seg_len.tolist() == [2, 0, 3, 0]
    starts, order = seg.seg_start.tolist(), seg.order.tolist()
    assert order[starts[0]:starts[0] + 2] == [2, 4] and order[starts[2]:starts[2] + 3] == [0, 3, 6]


@pytest.mark.parametrize("path", ["torch", "torch-mapping", "triton"])
def test_lora_b_may_be_a_view_of_rank_major_storage(path):
    """lora_b [S, out, R] stored as [S, R, out] (its transpose view): the layout that makes the
    expand matmul read B contiguously. Every path gives the same result as for contiguous B."""
    case = CASES["interleaved_odd"]
    impl = {"torch": lora_ops.add_lora_torch, "torch-mapping": with_mapping(lora_ops.add_lora_torch),
            "triton": lambda *args: pytest.importorskip("engine.kernels.triton_lora").add_lora(*args)}[path]

    def with_rank_major_b(y, x, a, b, slots, scaling):
        b_view = b.transpose(1, 2).contiguous().transpose(1, 2)
        assert b_view.shape == b.shape and b_view.stride(1) == 1
        impl(y, x, a, b_view, slots, scaling)

    check(case, with_rank_major_b, device="cpu" if path != "triton" else DEVICE)


def test_lora_ops_shrink_expand_public_functions():
    """lora_ops.lora_shrink / lora_expand (torch path on CPU) compose to add_lora."""
    case = CASES["decode_mixed"]
    y_full, x, a, b, slots, scaling = make_inputs(case, device="cpu")
    expected = naive_reference(y_full, x, a, b, slots, scaling)
    v = lora_ops.lora_shrink(x, a, slots)
    assert torch.equal(v[slots < 0], torch.zeros_like(v[slots < 0]))
    lora_ops.lora_expand(y_full, v, b, slots, scaling)
    assert_close(y_full, expected, torch.float32)
