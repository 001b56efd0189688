"""The trellis search of EXL3: the 16-bit states of a tail-biting ring that best match a tile.

A tile is 256 weights in ring position order (core.formats.exl3.layout.tile_positions).
Position p adds D(p) new bits to a 16-bit state: s(p) = ((s(p-1) << D(p)) | new) & 0xFFFF,
and the ring closes, so s(0) also follows s(255) that way. The encoder minimises
sum_p (codebook[s(p)] - w(p))^2 with a Viterbi search over the 2^(16-D) "nodes", the
16-D overlap bits that two consecutive states share (../shared/EXL3.md sections 2 and 5).

Tail-biting follows ExLlamaV3's two passes: a first pass starting unconstrained at
position 128 runs once around the ring; tracing it back gives the node where the ring
wraps (between positions 255 and 0); a second pass over positions 0..255 starts from
that node only and must end on it. Every ring it returns is valid; it is the best ring
through that wrap node, which is almost always the best ring.

Exact arithmetic (a CUDA kernel with the same contract must match it bit for bit):
- values stay float32 as given (not rounded to fp16); v = float32(fp16 codebook value);
- a state's cost = node cost + d * d with d = v - w, each op rounded to float32 (no FMA);
- a node's cost = min over its 2^D predecessors (the states s = t << (16-D) | node);
  on equal costs the lowest t (the lowest predecessor state) wins;
- the first pass visits positions 128..255, 0..127 with every node entering 128 at cost 0,
  ends on the lowest-cost state at 127 (lowest state on ties) and traces back to s(0);
  the wrap node is s(0) >> D(0);
- the second visits 0..255 with the wrap node entering 0 at cost 0 and the others at +inf,
  and ends on the lowest-cost state at 255 whose low 16-D(0) bits are the wrap node
  (lowest state on ties); its trace back is the ring.
ExLlamaV3's own kernel works in fp16 with fp16 FMA, so it picks other (still valid) states.
"""

from __future__ import annotations

import torch

from ...formats.exl3 import kernel
from ...formats.exl3.codebook import STATE_BITS, STATES, codebook_values
from ...formats.exl3.layout import POSITIONS, step_bits

# Back-pointers take 256 * 2^(16-D) bytes per tile (8 MiB at D = 1; 4x that where node
# costs are kept instead, see _keeps_pointers); tiles are searched in chunks that keep
# them plus the float32 cost plane within this budget.
CHUNK_BYTES_CPU = 256 << 20
CHUNK_BYTES_CUDA = 2 << 30
_MAX_CHUNK_TILES = 1024
_FIRST_PASS_START = POSITIONS // 2


def decode_states(states: torch.Tensor, codebook: str) -> torch.Tensor:
    """int [..., 256] 16-bit states -> fp16 [..., 256]: the value each state decodes to."""
    table = codebook_values(codebook).to(states.device)
    return table[states.to(torch.int64)]


def _keeps_pointers(device: torch.device) -> bool:
    # A min that also returns indices is ~10x slower than amin on the CPU, so there the
    # search keeps each position's node costs (4 bytes a node, not 1) and recomputes the
    # few predecessor costs it needs while tracing back: the same float32 operations,
    # so the same choices bit for bit. On a GPU both mins cost the same memory traffic.
    return device.type == "cuda"


def _chunk_tiles(steps: list[int], device: torch.device) -> int:
    node_bytes = 1 if _keeps_pointers(device) else 4
    memory_bytes = sum(node_bytes << (STATE_BITS - d) for d in steps)
    plane_bytes = 2 * STATES * 4
    budget = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES_CPU
    return max(1, min(_MAX_CHUNK_TILES, budget // (memory_bytes + plane_bytes)))


def _forward(values: torch.Tensor, table: torch.Tensor, steps: list[int], order: list[int],
             start_costs: torch.Tensor, pointers: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the search over positions `order`. Returns the last position's state costs
    [tiles, 65536] and what the trace back needs: with `pointers`, memory[i] holds each node's
    chosen predecessor top bits (uint8) for the step into order[i + 1]; without, memory[i]
    holds the node costs (float32) entering order[i]."""
    tiles = values.shape[0]
    node_costs = start_costs
    memory = []
    # One plane and one store for all node costs, reused: fresh large tensors at every
    # position cost the CPU as much time in page faults as in arithmetic.
    costs = torch.empty(tiles, STATES, dtype=torch.float32, device=values.device)
    store = None
    if not pointers:
        store = torch.empty(tiles * sum(STATES >> steps[p] for p in order[1:]), dtype=torch.float32, device=values.device)
    used = 0
    for index, p in enumerate(order):
        d = steps[p]
        nodes = STATES >> d
        if not pointers:
            memory.append(node_costs)
        # State s = node << d | new, so the plane is a [tiles, nodes, 2^d] view of the 65536 states.
        torch.sub(table.view(1, STATES), values[:, p].view(tiles, 1), out=costs)
        costs.mul_(costs)
        costs.view(tiles, nodes, 1 << d).add_(node_costs.view(tiles, nodes, 1))
        if index + 1 < len(order):
            d_next = steps[order[index + 1]]
            # Predecessors of a next-position node: the states t << (16 - d_next) | node.
            grouped = costs.view(tiles, 1 << d_next, STATES >> d_next)
            if pointers:
                node_costs, top = grouped.min(dim=1)  # the first (lowest t) minimum on ties
                memory.append(top.to(torch.uint8))
            else:
                size = tiles * (STATES >> d_next)
                node_costs = store[used:used + size].view(tiles, STATES >> d_next)
                torch.amin(grouped, dim=1, out=node_costs)
                used += size
    return costs, memory


def _trace(last_states: torch.Tensor, memory: list[torch.Tensor], values: torch.Tensor, table: torch.Tensor,
           steps: list[int], order: list[int], pointers: bool, stop: int = 1) -> dict[int, torch.Tensor]:
    """Follow the best predecessors from the states at order[-1] down to order[stop - 1]."""
    states = {order[-1]: last_states}
    current = last_states
    for index in range(len(order) - 1, stop - 1, -1):
        d = steps[order[index]]
        node = current >> d
        if pointers:
            top = memory[index - 1].gather(1, node.unsqueeze(1)).squeeze(1).to(torch.int64)
        else:
            previous = order[index - 1]
            candidates = (torch.arange(1 << d, device=node.device).unsqueeze(0) << (STATE_BITS - d)) | node.unsqueeze(1)
            difference = table[candidates] - values[:, previous:previous + 1]
            entering = memory[index - 1].gather(1, candidates >> steps[previous])
            top = (entering + difference * difference).argmin(dim=1)  # the first (lowest t) minimum on ties
        current = (top << (STATE_BITS - d)) | node
        states[order[index - 1]] = current
    return states


def _first_pass_wrap_nodes(values: torch.Tensor, table: torch.Tensor, steps: list[int], pointers: bool) -> torch.Tensor:
    """Once around the ring from the middle, unconstrained: the node where its best path wraps."""
    order = list(range(_FIRST_PASS_START, POSITIONS)) + list(range(_FIRST_PASS_START))
    free_start = torch.zeros(values.shape[0], STATES >> steps[order[0]], dtype=torch.float32, device=values.device)
    costs, memory = _forward(values, table, steps, order, free_start, pointers)
    best_end = costs.argmin(dim=1)  # the first (lowest) state on ties
    del costs
    first = _trace(best_end, memory, values, table, steps, order, pointers, stop=POSITIONS - _FIRST_PASS_START + 1)
    return first[0] >> steps[0]  # the high 16-D(0) bits of s(0) = the low bits of s(255)


def _best_ring_through(values: torch.Tensor, table: torch.Tensor, steps: list[int],
                       wrap_nodes: torch.Tensor, pointers: bool) -> torch.Tensor:
    """Positions 0..255 from each tile's wrap node, ending on a state that closes the ring there."""
    tiles, device, d0 = values.shape[0], values.device, steps[0]
    order = list(range(POSITIONS))
    start = torch.full((tiles, STATES >> d0), float("inf"), dtype=torch.float32, device=device)
    start.scatter_(1, wrap_nodes.unsqueeze(1), 0.0)
    costs, memory = _forward(values, table, steps, order, start, pointers)
    closing = (torch.arange(1 << d0, device=device).unsqueeze(0) << (STATE_BITS - d0)) | wrap_nodes.unsqueeze(1)
    top = costs.gather(1, closing).argmin(dim=1)
    del costs
    last = closing.gather(1, top.unsqueeze(1)).squeeze(1)
    ring = _trace(last, memory, values, table, steps, order, pointers)
    return torch.stack([ring[p] for p in range(POSITIONS)], dim=1)


def _encoder(values: torch.Tensor, bits: float, codebook: str):
    if values.dim() != 2 or values.shape[1] != POSITIONS:
        raise ValueError(f"an EXL3 trellis search takes [tiles, {POSITIONS}] values, not {list(values.shape)}")
    steps = [int(d) for d in step_bits(bits)]
    table = codebook_values(codebook).to(device=values.device, dtype=torch.float32)
    return values.to(torch.float32), table, steps


def encode_through_wrap_nodes(values: torch.Tensor, bits: float, codebook: str, wrap_nodes: torch.Tensor,
                              chunk_tiles: int | None = None) -> torch.Tensor:
    """The second pass alone: each tile's best ring whose wrap node (the high 16-D(0) bits of
    s(0), int [tiles]) is given. encode_tiles is this with the first pass's nodes."""
    values, table, steps = _encoder(values, bits, codebook)
    wrap_nodes = wrap_nodes.to(device=values.device, dtype=torch.int64)
    chunk = chunk_tiles or _chunk_tiles(steps, values.device)
    pointers = _keeps_pointers(values.device)
    out = torch.empty(values.shape, dtype=torch.int64, device=values.device)
    for begin in range(0, values.shape[0], chunk):
        part = values[begin:begin + chunk].contiguous()
        out[begin:begin + chunk] = _best_ring_through(part, table, steps, wrap_nodes[begin:begin + chunk], pointers)
    return out


def encode_tiles(values: torch.Tensor, bits: float, codebook: str, chunk_tiles: int | None = None) -> torch.Tensor:
    """float [tiles, 256] in position order -> int64 [tiles, 256]: the states of a valid
    tail-biting ring per tile that minimise the squared error to the codebook's values.

    Runs on the device of `values`, `chunk_tiles` at a time (default: by a memory budget)."""
    values, table, steps = _encoder(values, bits, codebook)
    chunk = chunk_tiles or _chunk_tiles(steps, values.device)
    pointers = _keeps_pointers(values.device)
    out = torch.empty(values.shape, dtype=torch.int64, device=values.device)
    for begin in range(0, values.shape[0], chunk):
        part = values[begin:begin + chunk].contiguous()
        wrap_nodes = _first_pass_wrap_nodes(part, table, steps, pointers)
        out[begin:begin + chunk] = _best_ring_through(part, table, steps, wrap_nodes, pointers)
    return out


def search_tiles(values: torch.Tensor, bits: float, codebook: str) -> torch.Tensor:
    """encode_tiles on the CUDA kernel where it runs (core/formats/exl3/kernel.py: built and switched on),
    else in torch: the same states either way."""
    if kernel.on_kernels(values):
        return kernel.viterbi(values, bits, codebook)
    return encode_tiles(values, bits, codebook)
