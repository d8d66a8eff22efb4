"""The distill_carrier loss of batched students with the LM head on the carrier's columns only.

The loss renormalises the student's distribution over the carrier's tokens, so the other columns' logits are
never needed: the backbone's final hidden states at the distilled positions times each student's carrier rows of
the head. Used by :func:`sublim.backends.multi.finetune_many` when every student of a batch shares one column set
and the architecture's logits are a plain head over the last hidden state.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sublim.backends.packed import pack_rows, packed_hidden
from sublim.backends.stacked import StackedLinear
from sublim.spec import TrainSpec

__all__ = ["carrier_head", "carrier_losses"]

# causal LMs whose logits are exactly ``lm_head(model(...).last_hidden_state)`` (no scaling, no soft-capping)
_PLAIN_HEADS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}


def carrier_head(model: Any, spec: TrainSpec, targets: list[list[torch.Tensor]] | None,
                  cols: Sequence[torch.Tensor | None] | None, batch: list[tuple[int, int]],
                  jobs: Sequence[Any]) -> torch.Tensor | None:
    """The carrier columns every student of the batch is distilled on, when the LM head can run on those
    columns alone: ``distill_carrier`` with cached teacher targets, one column set for all students, no
    loss masks, and a stacked head of a plain architecture. Else None (the general path)."""
    if spec.objective != "distill_carrier" or targets is None or not cols or cols[0] is None:
        return None
    if type(model).__name__ not in _PLAIN_HEADS or not isinstance(model.get_output_embeddings(), StackedLinear):
        return None
    if model.get_output_embeddings().bias is not None or any(c is None or not torch.equal(c, cols[0]) for c in cols):
        return None
    if any(jobs[s].encoded[i].loss_mask is not None for s, i in batch):
        return None
    return cols[0]


def carrier_losses(model: Any, sub: torch.Tensor, enc: list[Any], batch: list[tuple[int, int]], S: int, b: int,
                    pad: int, targets: list[list[torch.Tensor]], positions: list[list[list[int]]] | None,
                    soft: tuple[float, int | None]) -> list[tuple[torch.Tensor, int]]:
    """Each student's distill_carrier loss with the LM head run on the carrier columns only (the loss
    renormalises over them, so the other columns' logits are never needed): the backbone's final hidden
    states at the distilled positions, times each student's head rows ``sub``. Each student's rows (prompt +
    completion) are packed into one line (:mod:`sublim.backends.packed`), attention kept within rows.
    Equal to the general path up to float summation order (tests/test_multi.py)."""
    from sublim.backends.train import kl_per_token

    seqs = [e.prompt + e.completion for e in enc]
    if positions is None:
        pos = [list(range(len(e.prompt), len(e.prompt) + len(e.completion))) for e in enc]
    else:
        pos = [positions[s][i] for s, i in batch]
    rows = pack_rows(seqs, S, pad)
    hidden = packed_hidden(model, rows)  # [S*N, H]
    h = hidden[torch.tensor([rows.flat(i, t - 1) for i, ts in enumerate(pos) for t in ts], dtype=torch.long)]
    w = model.get_output_embeddings().weight[:, sub, :]  # [S, k, H]
    sizes = [sum(len(p) for p in pos[s * b:(s + 1) * b]) for s in range(S)]
    out = []
    for s, hs in enumerate(torch.split(h, sizes)):
        n = sizes[s]
        if n == 0:
            out.append((w[s].sum() * 0.0, 0))
            continue
        sl = (hs @ w[s].to(hs.dtype).T).float()
        tl = torch.cat([targets[s][i] for _, i in batch[s * b:(s + 1) * b]])
        out.append((kl_per_token(sl, tl, *soft), n))
    return out
