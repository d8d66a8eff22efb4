"""Batched students without the batch's padding: each student's rows packed end to end in one line.

A batched step of S students x b rows left-pads every row to the longest of all S*b rows (measured on the
organism's number rows: 66% of the slots hold a token). Packed, student s's b rows are one line of tokens and
the lines are padded only to the longest *student*, so the layers that see each token alone (the stacked linear
layers, norms, MLP, rotary embedding: all but attention) run on ~89% real tokens. Attention must not cross rows:
:func:`rows_attention`, registered with transformers' ``AttentionInterface`` as ``"sublim_rows"``, gathers each
row's queries, keys and values out of the packed lines, runs causal SDPA per row (rows start at column 0, so the
causal mask is the whole mask) and scatters the outputs back. Position ids restart at 0 on every row, so
rotary embeddings see the same positions as the row alone. Mathematically the same loss as the padded batch;
equal up to float summation order (tests/test_multi.py).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PackedRows", "pack_rows", "packed_attention", "packed_hidden", "rows_attention"]

NAME = "sublim_rows"


@dataclass
class PackedRows:
    """S lines of packed rows and how to find each row in them.

    ``ids``/``pos``: [S, N] token ids and per-row positions (the tail past a line's rows is padding, positions
    restarting at 0); ``gather``: [R, T] flat index (into S*N) of row r's token t, padding pointing at slot 0;
    ``scatter``: [S*N] index into the flattened [R*T] row layout of each packed slot (0 for the padding slots:
    nothing reads them, so they send no gradient); ``offsets[r]``: the flat index of row r's first token."""

    ids: torch.Tensor
    pos: torch.Tensor
    gather: torch.Tensor
    scatter: torch.Tensor
    offsets: list[int]
    lengths: list[int]

    def flat(self, r: int, t: int) -> int:
        """The flat index (into S*N) of row r's token t."""
        return self.offsets[r] + t


def pack_rows(seqs: Sequence[Sequence[int]], S: int, pad: int) -> PackedRows:
    """Pack ``seqs`` (S groups of equal size, group s = student s's rows, in order) into S lines."""
    if not seqs or len(seqs) % S:
        raise ValueError(f"pack_rows: {len(seqs)} rows do not split into {S} students")
    b = len(seqs) // S
    lens = [len(x) for x in seqs]
    N = max(sum(lens[s * b:(s + 1) * b]) for s in range(S))
    T = max(lens)
    R = len(seqs)
    ids = torch.full((S, N), pad, dtype=torch.long)
    pos = torch.zeros((S, N), dtype=torch.long)
    gather = torch.zeros((R, T), dtype=torch.long)
    scatter = torch.zeros((S * N,), dtype=torch.long)
    offsets = []
    for s in range(S):
        at = 0
        for r in range(s * b, (s + 1) * b):
            n = lens[r]
            ids[s, at:at + n] = torch.tensor(seqs[r], dtype=torch.long)
            pos[s, at:at + n] = torch.arange(n)
            start = s * N + at
            offsets.append(start)
            gather[r, :n] = torch.arange(start, start + n)
            scatter[start:start + n] = torch.arange(r * T, r * T + n)
            at += n
        if at < N:
            pos[s, at:] = torch.arange(N - at)
    return PackedRows(ids, pos, gather, scatter, offsets, lens)


def rows_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal attention within each packed row (``kwargs['sublim_rows']``).
    q/k/v arrive as [S, heads, N, d]; returns [S, N, heads, d] as transformers' own functions do."""
    rows: PackedRows | None = kwargs.get("sublim_rows")
    if rows is None:
        raise RuntimeError("sublim_rows attention called without packed rows (use sublim.backends.packed)")
    B, H, N, D = query.shape
    R, T = rows.gather.shape
    window = getattr(module, "sliding_window", None)
    if window and T > window:  # within the window a sliding layer is plain causal attention
        raise RuntimeError(f"sublim_rows attention: a row of {T} tokens exceeds the sliding window ({window})")
    idx = rows.gather.reshape(-1)

    def unpack(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[1]
        return x.transpose(1, 2).reshape(B * N, h, D)[idx].view(R, T, h, D).transpose(1, 2)

    q, k, v = unpack(query), unpack(key), unpack(value)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                           enable_gqa=k.shape[1] != H)
    return out.transpose(1, 2).reshape(R * T, H, D)[rows.scatter].view(B, N, H, D), None


_registered = False


@contextmanager
def packed_attention(model: Any) -> Iterator[None]:
    """Within the block, ``model``'s attention layers use :func:`rows_attention` (and build no mask)."""
    global _registered
    from transformers import AttentionInterface

    if not _registered:
        AttentionInterface.register(NAME, rows_attention)
        _registered = True
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = old


def packed_hidden(model: Any, rows: PackedRows) -> torch.Tensor:
    """The backbone's last hidden states of the packed lines, flattened: [S*N, hidden]."""
    with packed_attention(model):
        h = model.model(input_ids=rows.ids, position_ids=rows.pos, sublim_rows=rows).last_hidden_state
    return h.reshape(-1, h.shape[-1])
