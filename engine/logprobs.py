"""Log-probabilities of sampled tokens, taken from the raw model distribution (before penalties
and temperature, like vLLM's default), so they describe what the model itself believed."""
from __future__ import annotations

import torch


def chosen_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`[N]` logprob of each row's chosen token under softmax(logits).

    Costs one logsumexp over the batch and no `[N, V]` log-softmax temporary."""
    picked = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=1)


def top_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                 num_top: list[int | None]) -> list[dict[int, float] | None]:
    """Per row: None when `num_top[i]` is None, else a dict holding the chosen token and the
    `num_top[i]` most likely tokens (ids -> logprob), inserted most-likely first with the chosen
    token first of all. Only the rows that asked are log-softmaxed."""
    wanted = [i for i, n in enumerate(num_top) if n is not None]
    result: list[dict[int, float] | None] = [None] * len(num_top)
    if not wanted:
        return result
    idx = torch.tensor(wanted, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, idx), dim=-1)
    chosen_ids = token_ids.index_select(0, idx)
    chosen = lp.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
    k = max(num_top[i] for i in wanted)
    top_vals, top_ids = lp.topk(k, dim=-1)  # k may be 0: empty rows
    top_vals, top_ids, chosen_ids = top_vals.tolist(), top_ids.tolist(), chosen_ids.tolist()
    for j, row in enumerate(wanted):
        n = num_top[row]
        entry = {chosen_ids[j]: chosen[j]}
        for tid, val in zip(top_ids[j][:n], top_vals[j][:n]):
            entry.setdefault(tid, val)
        result[row] = entry
    return result
