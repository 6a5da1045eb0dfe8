"""Token packing: the decoder runs on real tokens only, never on padding.

A padded batch holds R = M*B member-major rows of T tokens, but only `lengths[r]` of row r are
real, and every linear layer, norm and elementwise op of a decoder layer acts on each token
alone, so padding costs them as much as a real token (how much padding a bucketed batch holds:
docs/design.md, "Choices we measured").

Here the B rows of each member are packed end to end into one row of P tokens (P: the longest
member's total, so only the members' totals are padded):

    padded [R, T]  --pack-->  packed [M, P]

The decoder runs on the packed rows; `MemberLoraLinear` still sees member k's tokens in row k.
Only attention needs the rows apart: `loraens.fast.attention` moves q, k and v to the padded layout
[R, H, T, d] (`to_rows`), attends there with the batch's own [R, 1, T, T] mask, and moves the
output back (`to_packed`). Each move is a gather of a few MB per layer, and its backward is the
opposite gather (no scatter-add): every real slot of one layout is read by exactly one slot of
the other, and padding slots read a zero row, so padding gets and gives no gradient.

Positions come with the tokens, so rotary embeddings are those of the padded rows, and the
result is the padded forward's up to bf16 rounding (GEMM blocking depends on the shapes), which
`tests/test_packing.py` checks against the padded forward.

Supported: `loraens.fast.support.can_pack` (the Llama layout with `loraens.fast.attention`'s
grouped eager attention). Other models run the padded forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..batching import Batch

KWARG = "loraens_packing"  # the decoder forward's keyword argument that carries a `Packing`


class Packing(NamedTuple):
    """Where each token of R padded rows [R, T] sits in M packed rows [M, P], and back.

    row_src:    [R*T] long: the packed slot (k*P + j) of each padded slot, or M*P (a zero row)
                for padding.
    packed_src: [M*P] long: the padded slot (r*T + t) of each packed slot, or R*T for padding.
    block_mask: FlexAttention's `BlockMask` over the packed rows (`loraens.fast.attention.
                flex_block_mask`), when the model attends with "loraens_flex"; else None.
    """

    row_src: torch.Tensor
    packed_src: torch.Tensor
    block_mask: object | None = None


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of [N, F] `x`, where index N reads a zero row: [len(index), F]."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, index)


class _Relayout(torch.autograd.Function):
    """`x[src]` with zero rows for padding; the backward is the gather the other way (`back`).

    Exact because the map between real slots is one to one: the gradient of real slot s of `x`
    is the gradient of the one output slot that reads it, and a padding slot of `x`, read by
    nothing real, gets zero (`back` points it at the zero row).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(back)
        return _take(x, src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (back,) = ctx.saved_tensors
        return _take(grad.contiguous(), back), None, None


def to_rows(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Packed [M*P, F] -> padded [R*T, F] (padding slots zero)."""
    return _Relayout.apply(x, packing.row_src, packing.packed_src)


def to_packed(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Padded [R*T, F] -> packed [M*P, F] (padding slots zero)."""
    return _Relayout.apply(x, packing.packed_src, packing.row_src)


def pack(batch: Batch, num_members: int) -> tuple[torch.Tensor, torch.Tensor, Packing]:
    """Pack `batch`'s member-major rows: (input_ids [M, P], position_ids [M, P], packing).

    Row r = k*B + i (member k, question i) goes into packed row k after the member's earlier
    rows, its `lengths[r]` real tokens only. Packed padding has token 0 at position 0.
    """
    assert batch.lengths is not None, "packing needs the rows' lengths"
    r, t = batch.input_ids.shape
    m = num_members
    device = batch.input_ids.device
    lengths = batch.lengths.to(device)
    per_member = lengths.view(m, r // m)  # [M, B]
    offsets = (per_member.cumsum(1) - per_member).flatten()  # [R]: start of each row in its packed row
    p = int(per_member.sum(1).max())
    member = torch.arange(r, device=device) // (r // m)  # [R]
    slot = (member * p + offsets)[:, None] + torch.arange(t, device=device)  # [R, T]: packed slot of each token
    real = torch.arange(t, device=device)[None] < lengths[:, None]  # [R, T]
    row_src = torch.where(real, slot, m * p).flatten()  # [R*T]
    packed_src = torch.full((m * p,), r * t, dtype=torch.long, device=device)
    packed_src[slot[real]] = torch.arange(r * t, device=device).view(r, t)[real]
    ids = torch.zeros(m * p, dtype=batch.input_ids.dtype, device=device)
    pos = torch.zeros(m * p, dtype=batch.position_ids.dtype, device=device)
    ids[slot[real]] = batch.input_ids[real]
    pos[slot[real]] = batch.position_ids[real]
    return ids.view(m, p), pos.view(m, p), Packing(row_src, packed_src)


def padding_mask(batch: Batch) -> torch.Tensor:
    """The [R, 1, T, T] boolean attention mask of `batch` (True = may attend).

    Choice-likelihood batches carry their block mask; for letter rows (plain causal attention)
    it is causal over each row's real tokens. A padding query also sees itself (never read, but a
    query with no key at all would give NaN).
    """
    if batch.attention_mask is not None:
        return batch.attention_mask
    t = batch.input_ids.shape[1]
    idx = torch.arange(t, device=batch.input_ids.device)
    causal = idx[:, None] >= idx[None, :]  # [T, T]
    real = idx[None] < batch.lengths.to(idx.device)[:, None]  # [R, T]
    allowed = causal[None] & real[:, None, :]  # keys beyond a row's length are padding
    allowed |= torch.eye(t, dtype=torch.bool, device=idx.device)[None] & ~real[:, :, None]
    return allowed[:, None]
