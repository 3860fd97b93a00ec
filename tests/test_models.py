"""Our model implementations against transformers, through the paged KV cache.

Each architecture: several prompts packed into one flat batch (logits at every position), a few
decode steps fed with transformers' greedy tokens (one step also prefills a new prompt, decodes
first), and a prompt prefilled in two chunks. Block size 16, lengths not multiples of 16, and
block tables that are not in order, so the slot arithmetic is exercised.
"""
from __future__ import annotations

import pytest
import torch

from engine.attention_metadata import AttentionMetadata
from engine.models.loader import load_model, resolve_model
from tests.checkpoints import ARCHS, load_reference, make_tiny_checkpoint

BLOCK_SIZE = 16
NUM_BLOCKS = 24
ATOL = RTOL = 1e-4


class PagedRunner:
    """Drives one of our models step by step with a real KV cache; each sequence gets its own
    blocks (handed out from the end of the cache, so tables are not the identity)."""

    def __init__(self, model, dtype=torch.float32, device="cpu"):
        spec = model.kv_spec
        self.model, self.device = model, device
        shape = spec.layer_shape(NUM_BLOCKS, BLOCK_SIZE)
        self.caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.free = list(range(NUM_BLOCKS))
        self.tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    def step(self, feeds: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """feeds: (sequence id, new tokens), decodes first. Returns each feed's logits [q, vocab]."""
        logits, query_lens = self.step_rows(feeds)
        return list(logits.split(query_lens))

    def step_rows(self, feeds: list[tuple[str, list[int]]], keep: list[int] | None = None):
        """Like `step`, with the model's ``keep_rows``: returns (logits of the kept flat-batch rows,
        or of every row when ``keep`` is None; the feeds' query lengths)."""
        query_lens, seq_lens, tables, ids, positions = [], [], [], [], []
        for sid, tokens in feeds:
            start = self.lengths.get(sid, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free.pop())
            self.lengths[sid] = end
            query_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(list(table))
            ids += tokens
            positions += range(start, end)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, self.device)
        with torch.inference_mode():
            ids_t = torch.tensor(ids, device=self.device)
            keep_t = None if keep is None else torch.tensor(keep, dtype=torch.long, device=self.device)
            hidden = self.model(ids_t, torch.tensor(positions, device=self.device), self.caches, meta, keep_rows=keep_t)
            logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return logits, query_lens


def hf_logits(ref, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([tokens])
    with torch.inference_mode():
        return ref(ids, attention_mask=torch.ones_like(ids)).logits[0].float()


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp(request.param)), request.param)
    ours = load_model(resolve_model(path), load_reference(path).config, torch.float32, "cpu", attention_backend="torch")
    return ours, load_reference(path)


def random_prompt(length: int, gen: torch.Generator, vocab: int = 49152) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


def test_prefill_then_decode_matches_transformers(pair):
    ours, ref = pair
    gen = torch.Generator().manual_seed(1)
    prompts = {"a": random_prompt(5, gen), "b": random_prompt(23, gen), "c": random_prompt(37, gen)}
    runner = PagedRunner(ours)

    out = runner.step(list(prompts.items()))
    for (sid, tokens), got in zip(prompts.items(), out):
        torch.testing.assert_close(got, hf_logits(ref, tokens), atol=ATOL, rtol=RTOL, msg=f"prefill {sid}")

    # Decode with transformers' greedy tokens; the first decode step also prefills prompt "d".
    seqs = {sid: list(t) for sid, t in prompts.items()}
    late = random_prompt(19, gen)
    for step in range(4):
        feeds = [(sid, [int(hf_logits(ref, toks)[-1].argmax())]) for sid, toks in seqs.items()]
        if step == 0:
            feeds.append(("d", late))
        out = runner.step(feeds)
        for (sid, tokens), got in zip(feeds, out):
            seqs.setdefault(sid, []).extend(tokens)
            want = hf_logits(ref, seqs[sid])[-len(tokens):]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=f"step {step} seq {sid}")
    # the greedy continuations must not be one repeated token, or the comparison proves little
    generated = seqs["c"][37:]
    assert len(set(generated)) > 1


def test_chunked_prefill_matches_transformers(pair):
    ours, ref = pair
    prompt = random_prompt(37, torch.Generator().manual_seed(2))
    want = hf_logits(ref, prompt)
    runner = PagedRunner(ours)
    first = runner.step([("x", prompt[:20])])[0]
    second = runner.step([("x", prompt[20:])])[0]  # attends to the 20 cached tokens
    torch.testing.assert_close(torch.cat([first, second]), want, atol=ATOL, rtol=RTOL)


def keep_rows_against_transformers(ours, ref) -> None:
    """Steps that keep only some rows (the runner keeps each sampled sequence's last token): the
    kept rows match transformers, and the dropped rows' K/V is still written, since later chunks
    and decodes attend to it. One step keeps no row at all."""
    gen = torch.Generator().manual_seed(3)
    a, b, c = random_prompt(7, gen), random_prompt(33, gen), random_prompt(37, gen)
    runner = PagedRunner(ours)
    # a and b prefill whole and are sampled; c's first chunk is not (rows 6 and 39 kept)
    got, _ = runner.step_rows([("a", a), ("b", b), ("c", c[:20])], keep=[6, 39])
    torch.testing.assert_close(got, torch.stack([hf_logits(ref, a)[-1], hf_logits(ref, b)[-1]]), atol=ATOL, rtol=RTOL)
    a.append(int(got[0].argmax()))
    b.append(int(got[1].argmax()))
    # decodes of a and b, and c's last chunk across a block boundary; b's row is dropped
    got, _ = runner.step_rows([("a", a[-1:]), ("b", b[-1:]), ("c", c[20:])], keep=[0, 18])
    torch.testing.assert_close(got, torch.stack([hf_logits(ref, a)[-1], hf_logits(ref, c)[-1]]), atol=ATOL, rtol=RTOL)
    got, _ = runner.step_rows([("d", c[:5])], keep=[])  # a chunk that nobody samples
    assert got.shape[0] == 0
    got, _ = runner.step_rows([("b", [5]), ("d", c[5:9])], keep=[0, 4])
    torch.testing.assert_close(got, torch.stack([hf_logits(ref, b + [5])[-1], hf_logits(ref, c[:9])[-1]]),
                               atol=ATOL, rtol=RTOL)


def test_keep_rows_matches_transformers(pair):
    keep_rows_against_transformers(*pair)


def test_kv_spec_and_max_model_len(pair):
    ours, ref = pair
    cfg = ref.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    assert ours.kv_spec.num_layers == (getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
    assert ours.kv_spec.num_kv_heads == (getattr(cfg, "num_key_value_heads", None) or heads)
    expected_head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    assert ours.kv_spec.head_dim == expected_head_dim
    assert ours.max_model_len == 2048
    assert not any(p.requires_grad for p in ours.parameters())
    assert not ours.training


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
], ids=["llama3", "linear"])
def test_rope_scaling_matches_transformers(tmp_path, rope):
    path = make_tiny_checkpoint(str(tmp_path), "llama", rope_parameters=rope)
    ref = load_reference(path)
    ours = load_model(resolve_model(path), ref.config, torch.float32, "cpu", attention_backend="torch")
    prompt = random_prompt(150, torch.Generator().manual_seed(3))  # longer than the original context
    got = PagedRunner(ours).step([("x", prompt)])[0]
    torch.testing.assert_close(got, hf_logits(ref, prompt), atol=ATOL, rtol=RTOL)


def test_triton_backend_integration(tmp_path):
    """Our model with the Triton attention backend (interpreter on CPU): q/k/v reach it as strided
    views of the fused projection output, which the kernels must handle."""
    path = make_tiny_checkpoint(str(tmp_path), "llama")
    ref = load_reference(path)
    ours = load_model(resolve_model(path), ref.config, torch.float32, "cpu", attention_backend="triton")
    gen = torch.Generator().manual_seed(4)
    prompts = {"a": random_prompt(7, gen), "b": random_prompt(20, gen)}
    runner = PagedRunner(ours)
    out = runner.step(list(prompts.items()))
    for (sid, tokens), got in zip(prompts.items(), out):
        torch.testing.assert_close(got, hf_logits(ref, tokens), atol=ATOL, rtol=RTOL)
    feeds = [(sid, [int(got[-1].argmax())]) for (sid, _), got in zip(prompts.items(), out)]
    for (sid, tokens), got in zip(feeds, runner.step(feeds)):
        want = hf_logits(ref, prompts[sid] + tokens)[-1:]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_cuda_matches_transformers(tmp_path, arch):
    """On a GPU: Triton attention and fused ops, fp32 against transformers (CPU), then bf16."""
    path = make_tiny_checkpoint(str(tmp_path), arch, with_tokenizer=False)
    ref = load_reference(path)
    gen = torch.Generator().manual_seed(5)
    prompts = {"a": random_prompt(9, gen), "b": random_prompt(33, gen)}
    for dtype, check in ((torch.float32, "exact"), (torch.bfloat16, "loose")):
        ours = load_model(resolve_model(path), ref.config, dtype, "cuda")
        runner = PagedRunner(ours, dtype, device="cuda")
        out = runner.step(list(prompts.items()))
        feeds = [(sid, [int(got[-1].argmax())]) for (sid, _), got in zip(prompts.items(), out)]
        out += runner.step(feeds)
        wants = [hf_logits(ref, t) for t in prompts.values()]
        wants += [hf_logits(ref, prompts[sid] + t)[-1:] for sid, t in feeds]
        for got, want in zip(out, wants):
            got = got.cpu()
            if check == "exact":
                torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
            else:
                assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.98


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_kernel_backend_matches_transformers(tmp_path, arch):
    """Each architecture with the C++ CPU attention kernel: a packed prefill, a decode step that
    also prefills a new prompt, and a prompt prefilled in two chunks, against transformers."""
    from engine.kernels.cpu_extension import cpu_ops_available

    if not cpu_ops_available():
        pytest.skip("the C++ CPU attention extension could not be built here (see the warning in the log)")
    path = make_tiny_checkpoint(str(tmp_path), arch)
    ref = load_reference(path)
    ours = load_model(resolve_model(path), ref.config, torch.float32, "cpu", attention_backend="cpu")
    gen = torch.Generator().manual_seed(6)
    prompts = {"a": random_prompt(7, gen), "b": random_prompt(33, gen)}
    runner = PagedRunner(ours)
    out = runner.step(list(prompts.items()))
    for (sid, tokens), got in zip(prompts.items(), out):
        torch.testing.assert_close(got, hf_logits(ref, tokens), atol=ATOL, rtol=RTOL)
    late = random_prompt(21, gen)
    feeds = [(sid, [int(got[-1].argmax())]) for (sid, _), got in zip(prompts.items(), out)] + [("c", late[:17])]
    for (sid, tokens), got in zip(feeds, runner.step(feeds)):
        full = (prompts[sid] + tokens) if sid in prompts else tokens
        torch.testing.assert_close(got, hf_logits(ref, full)[-len(tokens):], atol=ATOL, rtol=RTOL)
    got = runner.step([("c", late[17:])])[0]  # a chunk over 17 cached tokens, across a block boundary
    torch.testing.assert_close(got, hf_logits(ref, late)[17:], atol=ATOL, rtol=RTOL)
    keep_rows_against_transformers(ours, ref)
