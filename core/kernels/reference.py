"""The torch twins of the kernels in this folder, with the same arguments.

They define what the kernels must compute: the tests compare the two, and a
model takes these when the extension cannot be built (build.py says why).
The twins of a checkpoint format's products live in its folder under
core/formats/; the GPTQ block walk's twin beside its caller in core/convert/gptq.py.
"""

from __future__ import annotations

import torch

from ..rope import rotate_half


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """weight * RMSNorm(x) as core.model.RMSNorm computes it; with `residual`, x += residual first (in place)."""
    if residual is not None:
        x.add_(residual)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


NO_SLOT_INPUT = 0xFFFF


def slot_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [..., K] in a consumer's slot order: [rows, slots], slot s = x[..., index[s]], zero where the
    index (int16 holding uint16) is NO_SLOT_INPUT. The EXL2 small-batch product reads its input so."""
    rows = x.reshape(-1, x.shape[-1])
    index = index.long() & 0xFFFF
    padded = torch.cat((rows, rows.new_zeros(rows.shape[0], 1)), dim=1)
    return padded.index_select(1, torch.where(index == NO_SLOT_INPUT, rows.shape[1], index))


def rms_norm_slots(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                   index: list[torch.Tensor]) -> list[torch.Tensor]:
    """[x + residual (a new tensor; x itself without a residual), its rms_norm, then that in each
    slot table's order]. x is left as it is."""
    total = x + residual if residual is not None else x
    out = rms_norm(total, weight, eps)
    return [total, out, *(slot_gather(out, table) for table in index)]


def staged_input(x_slots: torch.Tensor, staged, layer: int) -> torch.Tensor:
    """The input the EXL2 product stages for `layer` from x_slots [rows, slots] (handoff.StagedInput):
    SwiGLU or the norm finished as silu_mul and rms_norm round them."""
    if staged is None:
        return x_slots
    if staged.up is not None:
        return silu_mul(x_slots, staged.up[layer])
    if staged.norm_weight is not None:
        rows = x_slots.shape[0]
        inverse_rms = torch.rsqrt(staged.squares[:rows, None] / staged.hidden + staged.eps)
        return staged.norm_weight[layer] * (x_slots.float() * inverse_rms).to(x_slots.dtype)
    return x_slots


def routed_output(out: torch.Tensor, route) -> torch.Tensor | None:
    """Sends a product's fp16 output [rows, n] where route (handoff.OutputRoute) says; returns the
    residual it was added into, or None."""
    if route.residual is not None:
        route.residual.add_(out.view_as(route.residual))
        out = route.residual.view(out.shape)
    for slot_of, slots_out in zip(route.slot_of, route.slots_out):
        slots_out[:, slot_of.long()] = out
    if route.squares is not None:
        route.squares[: out.shape[0]] += out.float().pow(2).sum(-1)
    return route.residual


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
               position: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """One token per batch row, all at one position: rotate q in place; rotated k and v go
    into the caches [batch, kv_heads, max_seq, dim] at position (the fused kernel's twin is batch 1)."""
    batch, dim = key_cache.shape[0], key_cache.shape[-1]
    cos, sin = cos_table.index_select(0, position), sin_table.index_select(0, position)
    queries, keys = q.view(batch, -1, dim), k.view(batch, -1, dim)
    queries.copy_(queries * cos + rotate_half(queries) * sin)
    key_cache.index_copy_(2, position, (keys * cos + rotate_half(keys) * sin).unsqueeze(2))
    value_cache.index_copy_(2, position, v.view(batch, -1, 1, dim))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def silu_mul_slots(gate: torch.Tensor, up: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return slot_gather(silu_mul(gate, up), index)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_table: torch.Tensor,
                     sin_table: torch.Tensor, position: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     length: int, window: int, scratch: torch.Tensor | None = None,
                     slot_of: torch.Tensor | None = None, slots_out: torch.Tensor | None = None) -> torch.Tensor:
    """One token (batch 1) at `position`: q and k rotated, k and v appended to the caches there,
    then `attend`. q [heads * dim] (left as it is) -> same shape. With `slots_out`, output i is
    also written to slots_out[slot_of[i]] (the next product's input in its slot order)."""
    q = q.clone()
    rope_cache(q, k, v, cos_table, sin_table, position, key_cache, value_cache)
    out = attend(q, key_cache, value_cache, position, length, window)
    if slots_out is not None:
        slots_out.view(-1)[slot_of.long()] = out
    return out


def slot_of_inputs(index: torch.Tensor) -> torch.Tensor:
    """int32 [inputs]: the slot each input index takes in a slot table (the inverse of slot_gather's index)."""
    index = index.long() & 0xFFFF
    real = index != NO_SLOT_INPUT
    slot_of = torch.full((int(real.sum()),), -1, dtype=torch.int32, device=index.device)
    slot_of[index[real]] = torch.arange(index.numel(), device=index.device, dtype=torch.int32)[real]
    return slot_of


def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, position: torch.Tensor,
           length: int, window: int) -> torch.Tensor:
    """One token's attention over the first `length` cache positions, keys after `position`, or
    window or more positions before it, hidden: q [heads * dim] -> same shape."""
    dim, kv_heads = key_cache.shape[-1], key_cache.shape[1]
    heads = q.numel() // dim
    keys = torch.arange(length, device=q.device)
    allowed = keys <= position
    if window:
        allowed &= keys > position - window
    out = torch.nn.functional.scaled_dot_product_attention(
        q.view(1, heads, 1, dim), key_cache[:, :, :length], value_cache[:, :, :length],
        attn_mask=allowed.view(1, 1, 1, length), enable_gqa=heads != kv_heads)
    return out.reshape(q.shape)
