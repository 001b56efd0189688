"""The CUDA kernels against their torch reference (run on the device machine; skipped elsewhere),
and the small-batch kernel's per-layer tables, which are made on the CPU and checked everywhere.

Every check draws fresh random packed weights and inputs; the reference is the
float32 product on the dequantized fp16 weights. Outputs are poisoned first: the
block the kernel's output will take from the caching allocator is filled with
NaN, so an element the kernel forgets to write shows up as NaN.
"""

import pytest
import torch

from bench.exl2_random import MIXES, layout_for, llama_config, random_exl2_tensors, random_model
from core.cache import KVCache
from core.formats.exl2 import kernel as exl2
from core.formats.exl2 import reference as exl2_reference
from core.formats.exl2.reference import dequantize_exl2
from core.kernels import dispatch, reference
from core.kernels.build import kernels
from core.kernels.handoff import OutputRoute, StagedInput
from tests.greedy_check import assert_same_greedy_choices
from tests.test_graph_decode import assert_every_piece_handed_over


# fp16 output of an fp32-accumulated product: about 2^-11 relative per element.
TOLERANCE = 2e-3
BITS = (2, 3, 4, 5, 6, 8)
# (in_features, out_features): the demo model's odd widths, and a last group ending mid-word.
SHAPES = [(576, 576), (576, 1536), (1536, 576), (532, 202)]
_seed = iter(range(10**6))


@pytest.fixture(autouse=True)
def built(request):
    if request.node.get_closest_marker("cuda"):
        assert kernels() is not None, "the kernels must build on the device machine"


def poison(numel: int) -> None:
    torch.full((numel,), float("nan"), dtype=torch.float16, device="cuda")


def layer(in_features, out_features, mix, group_size=None):
    group_size = group_size or (32 if in_features == 532 else 128)
    tensors = random_exl2_tensors(in_features, out_features, layout_for(in_features, mix, group_size), "cuda", next(_seed))
    return tensors, exl2.plan_layer(tensors, out_features)


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert not out.isnan().any(), "an output element was never written"
    return float((out.float() - expected).norm() / expected.norm())


def expected_product(x, tensors, out_features, bias=None):
    out = x.float() @ dequantize_exl2(tensors, out_features).float()
    return out + bias.float() if bias is not None else out


def check_small(tensors, plan, rows, bias=None):
    x = torch.randn(rows, plan.in_features, device="cuda").half()
    poison(rows * plan.out_features)
    out = exl2.gemm_small(x, tensors, plan, bias)
    assert out.shape == (rows, plan.out_features) and out.dtype == torch.float16
    error = relative_error(out, expected_product(x, tensors, plan.out_features, bias))
    assert error < TOLERANCE, f"{rows} rows: relative error {error:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_exl2_small_batch_matches_reference_at_each_width(bits, shape):
    tensors, plan = layer(*shape, [(bits, 1.0)])
    for rows in range(1, 17):
        check_small(tensors, plan, rows)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
def test_exl2_small_batch_mixed_widths_in_one_matrix(shape):
    # Every width in one matrix, highest first as act-order places them, with a bias.
    mix = [(8, 0.1), (6, 0.15), (5, 0.15), (4, 0.2), (3, 0.2), (2, 0.2)]
    tensors, plan = layer(*shape, mix)
    bias = torch.randn(shape[1], device="cuda").half()
    for rows in (1, 2, 3, 5, 8, 9, 16):
        check_small(tensors, plan, rows, bias)


@pytest.mark.cuda
@pytest.mark.parametrize("bpw", [2.5, 4.0, 6.0])
def test_exl2_small_batch_llama_mlp_shape(bpw):
    for shape in ((4096, 11008), (11008, 4096)):
        tensors, plan = layer(*shape, MIXES[bpw])
        for rows in (1, 4, 16):
            check_small(tensors, plan, rows)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(576, 1536), (4096, 4096)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_exl2_small_batch_same_function_for_every_launch_shape(shape, group_size, monkeypatch):
    # One K slice (the block writes its columns) or many (atomics, the last block writes),
    # few or many warps per block, one to four quads a warp;
    # groups of 128 rows take their scales after the mma, smaller ones on every weight.
    tensors, plan = layer(*shape, [(6, 0.25), (4, 0.5), (3, 0.25)], group_size)
    for blocks_per_sm, warps, per_warp, staged_bytes in ((1, 4, 4, 64 * 1024), (8, 1, 1, 64 * 1024),
                                                         (64, 3, 2, 4096), (2, 8, 2, 20000), (1, 8, 4, 64 * 1024)):
        monkeypatch.setattr(exl2, "BLOCKS_PER_SM", blocks_per_sm)
        monkeypatch.setattr(exl2, "WARPS", warps)
        monkeypatch.setattr(exl2, "QUADS_PER_WARP", per_warp)
        monkeypatch.setattr(exl2, "STAGED_BYTES", staged_bytes)
        exl2.launch_shape.cache_clear()
        for rows in (1, 7, 16):
            check_small(tensors, plan, rows)
    exl2.launch_shape.cache_clear()


def check_each_product(x, got, layers, biases):
    # Each layer's output of one launch against its own float32 product; the split-K scratch left zeroed.
    for out, (tensors, plan), bias in zip(got, layers, biases):
        assert out.shape == (x.shape[0], plan.out_features)
        error = relative_error(out, expected_product(x, tensors, plan.out_features, bias))
        assert error < TOLERANCE, f"{x.shape[0]} rows, {plan.out_features} columns: relative error {error:.2e}"
    assert int(exl2._scratch.buffers[x.device].count_nonzero()) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("in_features, outs", [(576, (576, 192, 192)), (4096, (4096, 4096, 1024)), (4096, (11008, 11008))])
def test_exl2_one_launch_for_layers_sharing_an_input(in_features, outs, monkeypatch):
    # q, k, v (or gate, up) in one launch: each layer its own widths, act-order and bias, some
    # split along K and some not, must give what each gives alone, and leave the scratch zeroed.
    mixes = [[(6, 0.25), (4, 0.5), (3, 0.25)], [(8, 0.1), (5, 0.4), (2, 0.5)], [(4, 1.0)]]
    layers = [layer(in_features, out, mixes[i]) for i, out in enumerate(outs)]
    biases = [None, torch.randn(outs[1], device="cuda").half(), None][: len(outs)]
    for blocks_per_sm, staged_bytes in ((2, 40 * 1024), (64, 4096)):
        monkeypatch.setattr(exl2, "BLOCKS_PER_SM", blocks_per_sm)
        monkeypatch.setattr(exl2, "STAGED_BYTES", staged_bytes)
        exl2.launch_shape.cache_clear()
        for rows in (1, 3, 8, 9, 16):
            x = torch.randn(rows, in_features, device="cuda").half()
            poison(rows * sum(outs) * 2)
            got = exl2.gemm_group(x, [(tensors, plan, bias) for (tensors, plan), bias in zip(layers, biases)])
            check_each_product(x, got, layers, biases)
    exl2.launch_shape.cache_clear()


@pytest.mark.cuda
@pytest.mark.parametrize("in_features, outs", [(532, (202,)), (576, (576, 192, 192)), (4096, (4096, 4096, 1024)),
                                               (11008, (4096,))])
def test_exl2_product_reads_inputs_a_producer_wrote_in_slot_order(in_features, outs):
    # The graph decoder's norms and SwiGLU write the product's input in each layer's slot order
    # (reference.slot_gather is their twin); the product then reads those rows, not x.
    mixes = [[(6, 0.25), (4, 0.5), (3, 0.25)], [(8, 0.1), (5, 0.4), (2, 0.5)], [(4, 1.0)]]
    layers = [layer(in_features, out, mixes[i]) for i, out in enumerate(outs)]
    biases = [torch.randn(outs[0], device="cuda").half(), None, None][: len(outs)]
    for rows in (1, 3, 8, 9, 16):
        x = torch.randn(rows, in_features, device="cuda").half()
        x_slots = [reference.slot_gather(x, plan.xperm) for _, plan in layers]
        poison(rows * sum(outs) * 2)
        got = exl2.matmul_slots(x_slots, [(tensors, plan, bias) for (tensors, plan), bias in zip(layers, biases)])
        check_each_product(x, got, layers, biases)


def slot_ordered_weight(tensors, plan):
    """The layer's dequantized weight [slots, N] with row s the weight of the input slot s stages (zero where none)."""
    weight = dequantize_exl2(tensors, plan.out_features).float()
    return torch.cat((weight, weight.new_zeros(1, weight.shape[1]))).index_select(0, plan.slot_source.long())


@pytest.mark.cuda
@pytest.mark.parametrize("in_features, outs", [(576, (576, 192, 192)), (4096, (4096, 4096, 1024)), (11008, (4096,))])
@pytest.mark.parametrize("piece", ["norm", "swiglu"])
def test_exl2_product_finishes_the_norm_or_swiglu_its_producer_left(in_features, outs, piece):
    # The graph decoder's o_proj and down leave the next norm to the products after them, and
    # gate/up leave SwiGLU to down: the product stages the finished inputs itself. Reference: the
    # fused norm or SwiGLU, gathered into slot order, times the float32 weights; and the torch twin.
    mixes = [[(6, 0.25), (4, 0.5), (3, 0.25)], [(8, 0.1), (5, 0.4), (2, 0.5)], [(4, 1.0)]]
    layers = [layer(in_features, out, mixes[i]) for i, out in enumerate(outs)]
    weight = (1 + 0.1 * torch.randn(in_features, device="cuda")).half()
    for rows in (1, 3, 9, 16):
        x = (4 * torch.randn(rows, in_features, device="cuda")).half()
        if piece == "norm":
            squares = x.float().pow(2).sum(-1)
            staged = StagedInput(norm_weight=[reference.slot_gather(weight, plan.xperm).view(-1) for _, plan in layers],
                                 squares=squares, eps=1e-5, hidden=in_features)
            finished = kernels().rms_norm(x.clone(), weight, 1e-5)
        else:
            up = torch.randn_like(x)
            staged = StagedInput(up=[reference.slot_gather(up, plan.xperm) for _, plan in layers])
            finished = kernels().silu_mul(x, up)
        x_slots = [reference.slot_gather(x, plan.xperm) for _, plan in layers]
        poison(rows * sum(outs) * 2)
        got = exl2.matmul_slots(x_slots, [(tensors, plan, None) for tensors, plan in layers], staged)
        check_each_product(finished, got, layers, [None] * len(layers))
        for i, (out, (tensors, plan)) in enumerate(zip(got, layers)):
            twin = reference.staged_input(x_slots[i], staged, i).float() @ slot_ordered_weight(tensors, plan)
            assert relative_error(out, twin) < TOLERANCE


@pytest.mark.cuda
@pytest.mark.parametrize("in_features, out_features", [(576, 576), (532, 202), (4096, 4096), (11008, 4096)])
def test_exl2_product_routes_its_output_into_the_residual_and_its_consumers_slot_orders(in_features, out_features):
    # o_proj and down add themselves into the residual stream and write the sum in the next
    # products' slot orders, with each row's sum of squares for the next norm; gate and up write
    # only the slot orders. Each split of K (4096 and 11008 split, 576 not) finishes them its own way.
    tensors, plan = layer(in_features, out_features, [(6, 0.25), (4, 0.5), (3, 0.25)])
    consumers = [layer(out_features, width, [(4, 1.0)])[1] for width in (256, 64, 96)]
    slot_of = tuple(reference.slot_of_inputs(consumer.xperm) for consumer in consumers)
    bias = torch.randn(out_features, device="cuda").half()
    for rows in (1, 2, 9, 16):
        x = torch.randn(rows, in_features, device="cuda").half()
        x_slots = [reference.slot_gather(x, plan.xperm)]
        residual = torch.randn(rows, out_features, device="cuda").half()
        expected_sum = residual.float() + expected_product(x, tensors, out_features, bias)
        buffers = tuple(torch.zeros(rows, consumer.xperm.numel(), device="cuda").half() for consumer in consumers)
        squares = torch.zeros(rows, device="cuda")
        route = OutputRoute(residual=residual, slot_of=slot_of, slots_out=buffers, squares=squares)
        got = exl2.matmul_slots(x_slots, [(tensors, plan, bias)], routes=[route])[0]
        assert got.data_ptr() == residual.data_ptr()
        assert relative_error(residual, expected_sum) < TOLERANCE
        for buffer, consumer in zip(buffers, consumers):
            # What the consumer reads: the sum itself in its order, zeros where a slot has no input.
            assert torch.equal(buffer, reference.slot_gather(residual, consumer.xperm))
        assert torch.allclose(squares, residual.float().pow(2).sum(-1), rtol=1e-5)
        assert int(exl2._scratch.buffers[x.device].count_nonzero()) == 0
        # Only slot orders (gate and up for down): no output tensor of its own.
        buffer = torch.zeros(rows, consumers[0].xperm.numel(), device="cuda").half()
        got = exl2.matmul_slots(x_slots, [(tensors, plan, bias)], routes=[OutputRoute(slot_of=slot_of[:1],
                                                                                      slots_out=(buffer,))])[0]
        assert got.numel() == 0
        expected = reference.slot_gather(expected_product(x, tensors, out_features, bias), consumers[0].xperm)
        assert relative_error(buffer, expected) < TOLERANCE


def test_handoff_twins_finish_and_route_as_the_pieces_they_replace():
    # The torch twins of the product's staging and routing (reference.staged_input, routed_output),
    # on the CPU: a slot table with empty slots, against rms_norm / silu_mul and slot_gather.
    generator = torch.Generator().manual_seed(4)
    width = 96
    table = torch.cat((torch.randperm(width, generator=generator), torch.full((32,), reference.NO_SLOT_INPUT)))
    table = table[torch.randperm(table.numel(), generator=generator)]
    table = torch.where(table >= 1 << 15, table - (1 << 16), table).to(torch.int16)
    x = (4 * torch.randn(3, width, generator=generator)).half()
    weight = (1 + 0.1 * torch.randn(width, generator=generator)).half()
    up = torch.randn(3, width, generator=generator).half()
    x_slots = reference.slot_gather(x, table)

    staged = StagedInput(norm_weight=[reference.slot_gather(weight, table).view(-1)],
                         squares=x.float().pow(2).sum(-1), eps=1e-5, hidden=width)
    expected = reference.slot_gather(reference.rms_norm(x.clone(), weight, 1e-5), table)
    assert torch.allclose(reference.staged_input(x_slots, staged, 0).float(), expected.float(), rtol=2e-3, atol=1e-3)
    swiglu = StagedInput(up=[reference.slot_gather(up, table)])
    assert torch.equal(reference.staged_input(x_slots, swiglu, 0), reference.slot_gather(reference.silu_mul(x, up), table))

    residual, before = up.clone(), up.clone()
    buffer, squares = torch.zeros(3, table.numel()).half(), torch.zeros(3)
    route = OutputRoute(residual=residual, slot_of=(reference.slot_of_inputs(table),), slots_out=(buffer,),
                        squares=squares)
    assert reference.routed_output(x, route) is residual
    assert torch.equal(residual, before + x)
    assert torch.equal(buffer, reference.slot_gather(residual, table))
    assert torch.allclose(squares, residual.float().pow(2).sum(-1))


@pytest.mark.cuda
def test_exl2_handoff_refuses_what_it_cannot_do():
    tensors, plan = layer(576, 576, [(4, 1.0)])
    x_slots = [reference.slot_gather(torch.randn(1, 576, device="cuda").half(), plan.xperm)]
    layers = [(tensors, plan, None)]
    weight_slots = [torch.ones(plan.xperm.numel(), device="cuda").half()]
    with pytest.raises(RuntimeError, match="SwiGLU or a norm, not both"):
        exl2.matmul_slots(x_slots, layers, StagedInput(up=x_slots, norm_weight=weight_slots,
                                                       squares=torch.ones(1, device="cuda"), hidden=576))
    with pytest.raises(RuntimeError, match="squares"):
        exl2.matmul_slots(x_slots, layers, StagedInput(norm_weight=weight_slots, hidden=576))
    slot_of = reference.slot_of_inputs(plan.xperm)
    buffer = torch.zeros(1, plan.xperm.numel(), device="cuda").half()
    with pytest.raises(ValueError, match="at most 3"):
        OutputRoute(slot_of=(slot_of,) * 4, slots_out=(buffer,) * 4)
    with pytest.raises(ValueError, match="one slot_of per slots_out"):
        OutputRoute(slot_of=(slot_of, slot_of), slots_out=(buffer,))
    with pytest.raises(RuntimeError, match="slot_of"):  # the binding's own check: the table of another width
        exl2.matmul_slots(x_slots, layers, routes=[OutputRoute(slot_of=(slot_of[:-1].clone(),), slots_out=(buffer,))])
    with pytest.raises(RuntimeError, match="residual"):
        exl2.matmul_slots(x_slots, layers, routes=[OutputRoute(residual=torch.zeros(1, 575, device="cuda").half())])


@pytest.mark.cuda
def test_model_projections_in_one_launch_match_one_by_one():
    # core.linear.project groups q/k/v and gate/up; the layers' own calls are the reference.
    from core.linear import project

    config = llama_config("small", layers=1, vocab=256)
    model = random_model(config, 4.0, "cuda", torch.float16)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for rows in (1, 5, 16, 17):
        x = torch.randn(1, rows, 576, device="cuda").half()
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            together = project(x, group)
            for out, single in zip(together, group):
                alone = single(x)
                assert out.shape == alone.shape
                assert relative_error(out, alone.float()) < TOLERANCE


@pytest.mark.cuda
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES[:2] + [(4096, 11008)])
def test_exl2_dequant_is_bit_exact(bits, shape):
    tensors, plan = layer(*shape, [(bits, 0.5), (2 if bits != 2 else 3, 0.5)])
    poison(shape[0] * shape[1])
    tile = exl2.dequant(tensors, plan)
    assert not tile.isnan().any()
    assert torch.equal(tile, exl2_reference.dequant(tensors, shape[1]))
    # In input order, as a prefill multiplies it: every row written, each where the format puts it.
    poison(shape[0] * shape[1])
    tile = exl2.dequant(tensors, plan, input_order=True)
    assert not tile.isnan().any()
    assert torch.equal(tile, dequantize_exl2(tensors, shape[1]).half())


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [17, 300, 2048])
def test_exl2_prefill_product_matches_reference(rows):
    tensors, plan = layer(1536, 576, [(6, 0.3), (4, 0.4), (3, 0.3)])
    x = torch.randn(2, rows, 1536, device="cuda").half()
    poison(2 * rows * 576)
    out = exl2.matmul(x, tensors, plan)
    assert out.shape == (2, rows, 576)
    assert relative_error(out, expected_product(x, tensors, 576)) < TOLERANCE


@pytest.mark.cuda
def test_small_batch_leaves_its_scratch_zeroed_for_the_next_layer():
    tensors, plan = layer(576, 1536, [(4, 1.0)])
    x = torch.randn(16, 576, device="cuda").half()
    exl2.gemm_small(x, tensors, plan)
    assert int(exl2._scratch.buffers[x.device].count_nonzero()) == 0


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_exl2_plan_stages_every_input_once(group_size):
    # The tables exl2.cu reads: each act-order row of every unit lands in exactly one staged
    # slot (through the act-order permutation), the rest of the slots stage a zero, and a quad
    # holds four units of one width whose "one group" flag says whether they share a group.
    mix = [(8, 0.1), (6, 0.15), (5, 0.15), (4, 0.2), (3, 0.2), (2, 0.2)]
    for in_features in (532, 4096):
        tensors = random_exl2_tensors(in_features, 64, layout_for(in_features, mix, 32 if in_features == 532 else group_size),
                                      "cpu", next(_seed))
        plan = exl2.plan_layer(tensors, 64, multiprocessors=132)
        xperm = plan.xperm.to(torch.int32) & 0xFFFF
        staged = xperm[xperm != exl2.NO_INPUT]
        assert torch.equal(staged.sort().values, torch.arange(in_features, dtype=torch.int32))
        # The inverse the decode attention kernel scatters through finds every input again.
        x = torch.randn(2, in_features)
        assert torch.equal(reference.slot_gather(x, plan.xperm)[:, reference.slot_of_inputs(plan.xperm).long()], x)
        # ...and the index the product's own gather (outside the graph) reads through agrees with the twin.
        padded = torch.nn.functional.pad(x, (0, 1))
        assert torch.equal(padded.index_select(1, plan.slot_source), reference.slot_gather(x, plan.xperm))
        units = plan.units.view(plan.quads, 4, 4)
        assert bool((units[:, :, 0] == units[:, :1, 0]).all())
        one_group = (units[:, :, 2] == units[:, :1, 2]).all(dim=1)
        assert torch.equal(units[:, :, 3].bool(), one_group[:, None].expand(-1, 4))
        # Real units walk the packed rows in order, b words each.
        real = units.view(-1, 4)[units.view(-1, 4)[:, 1] >= 0]
        assert torch.equal(real[1:, 1], (real[:-1, 1] + real[:-1, 0]))


@pytest.mark.parametrize("rows", [1, 4, 8, 9, 16])
def test_exl2_launch_shape_keeps_the_kernels_limits(rows):
    # What exl2_gemm_small refuses (bindings.cpp): slices that miss a quad or hold none, more than
    # 4 quads or 8 warps a block, more than 96 KiB of staged inputs. Shapes from the demo's 576 to
    # Llama's 11008 inputs, launches of one matrix up to q/k/v of a wide model.
    for quads in (1, 3, 5, 32, 86, 87, 200):
        for tiles in (1, 18, 128, 344, 1024):
            for blocks_per_sm, warps, per_warp in ((2, 8, 2), (1, 4, 4), (64, 3, 1), (4, 8, 4)):
                slices, per_slice, used_warps = exl2.launch_shape(quads, tiles, 132, rows, blocks_per_sm, warps, per_warp)
                assert (slices - 1) * per_slice < quads <= slices * per_slice
                assert 1 <= used_warps <= min(warps, 8)
                warp_quads = -(-per_slice // used_warps)
                assert warp_quads <= min(per_warp, 4)
                assert used_warps * rows * (warp_quads * 128 + 32) * 2 <= 96 * 1024


def greedy(model, prompt, steps):
    cache = KVCache(model.config, 256, device="cuda", dtype=torch.float16)
    ids = torch.tensor([prompt], device="cuda")
    tokens, logits_seen = [], []
    with torch.inference_mode():
        logits = model(ids, cache, 0, last_only=True)[0, -1]
        for step in range(steps):
            logits_seen.append(logits)
            token = int(logits.argmax())
            tokens.append(token)
            logits = model(torch.tensor([[token]], device="cuda"), cache, len(prompt) + step)[0, -1]
    return tokens, torch.stack(logits_seen)


@pytest.mark.cuda
@pytest.mark.parametrize("bpw", [2.5, 4.0])
def test_greedy_generation_with_kernels_matches_reference_path(bpw):
    model = random_model(llama_config("small", layers=4), bpw, "cuda", torch.float16, seed=3)
    prompt = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, our_logits = greedy(model, prompt, 32)
    # The kernel path keeps no dense copy of any weight on the GPU.
    assert all(module._dense is None for module in model.modules() if hasattr(module, "_dense"))
    with dispatch.reference_only():
        expected, expected_logits = greedy(model, prompt, 32)
    assert_same_greedy_choices(ours, our_logits, expected, expected_logits)


@pytest.mark.cuda
@pytest.mark.parametrize("bpw", [None, 4.0])
def test_graph_decode_matches_plain_decode_across_a_bucket_edge(bpw):
    from core.graph_decode import BUCKET, GraphDecoder

    model = random_model(llama_config("small", layers=2), bpw, "cuda", torch.float16, seed=5)
    prompt = torch.randint(0, model.config.vocab_size, (1, BUCKET - 4), device="cuda")
    plain_cache = KVCache(model.config, 2 * BUCKET, device="cuda", dtype=torch.float16)
    graph_cache = KVCache(model.config, 2 * BUCKET, device="cuda", dtype=torch.float16)
    decoder = GraphDecoder(model, graph_cache)
    if bpw:
        assert_every_piece_handed_over(decoder)
    with torch.inference_mode():
        model(prompt, plain_cache, 0)
        model(prompt, graph_cache, 0)
        token = 7
        for position in range(BUCKET - 4, BUCKET + 4):
            expected = model(torch.tensor([[token]], device="cuda"), plain_cache, position)[0, -1]
            ours = decoder.step(token, position)
            assert float((ours - expected).norm() / expected.norm()) < 5e-3
            token = int(expected.argmax())
    assert len(decoder.graphs) == 2


def close(ours: torch.Tensor, expected: torch.Tensor, tolerance: float = 2e-3) -> bool:
    assert not ours.isnan().any()
    return float((ours.float() - expected.float()).norm() / expected.float().norm()) < tolerance


@pytest.mark.cuda
# 580 and 20004 take the any-width kernel, 24576 and 40000 too (wider than the 16-byte kernel holds);
# the graph decoder calls the fused norm at any width.
@pytest.mark.parametrize("hidden", [576, 580, 4096, 5120, 20004, 24576, 40000])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rms_norm_matches_reference(hidden, with_residual):
    for rows in (1, 7):
        x = torch.randn(rows, hidden, device="cuda").half()
        weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).half()
        residual = torch.randn_like(x) if with_residual else None
        x_ours, x_expected = x.clone(), x.clone()
        poison(x.numel())
        ours = kernels().rms_norm(x_ours, weight, 1e-5, residual)
        expected = reference.rms_norm(x_expected, weight, 1e-5, residual)
        assert close(ours, expected, 1e-3)
        assert torch.equal(x_ours, x_expected)


@pytest.mark.cuda
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 128), (32, 32, 128), (4, 2, 18)])
def test_fused_rope_and_cache_append_match_reference(heads, kv_heads, dim):
    max_seq = 300
    angles = torch.rand(max_seq, dim // 2, device="cuda") * 100
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().half(), angles.sin().half()
    position = torch.tensor([137], device="cuda")
    q = torch.randn(1, 1, heads * dim, device="cuda").half()
    k = torch.randn(1, 1, kv_heads * dim, device="cuda").half()
    v = torch.randn(1, 1, kv_heads * dim, device="cuda").half()
    caches = [torch.randn(1, kv_heads, max_seq, dim, device="cuda").half() for _ in range(2)]
    ours_q, ours_caches = q.clone(), [c.clone() for c in caches]
    kernels().rope_cache(ours_q, k, v, cos, sin, position, *ours_caches)
    reference.rope_cache(q, k, v, cos, sin, position, *caches)
    assert close(ours_q, q, 1e-3)
    for ours, expected in zip(ours_caches, caches):
        assert close(ours, expected, 1e-3)
        # Nothing but the token's slot changed.
        assert torch.equal(ours[:, :, :137], expected[:, :, :137]) and torch.equal(ours[:, :, 138:], expected[:, :, 138:])


@pytest.mark.cuda
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 128), (4, 2, 18)])
@pytest.mark.parametrize("position,tokens", [(0, 1), (0, 300), (57, 13)])
def test_fused_rope_and_cache_write_of_a_prompt_match_the_model(heads, kv_heads, dim, position, tokens):
    # A prompt's tokens from `position` on, as Attention.forward computes them in torch.
    from core.rope import rotate_half

    max_seq = 400
    angles = torch.rand(tokens, dim // 2, device="cuda") * 100
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().half(), angles.sin().half()
    q = torch.randn(1, tokens, heads * dim, device="cuda").half()
    k = torch.randn(1, tokens, kv_heads * dim, device="cuda").half()
    v = torch.randn(1, tokens, kv_heads * dim, device="cuda").half()
    caches = [torch.randn(1, kv_heads, max_seq, dim, device="cuda").half() for _ in range(2)]
    ours_q, ours_caches = q.clone(), [c.clone() for c in caches]
    kernels().rope_cache_rows(ours_q, k, v, cos, sin, position, *ours_caches)
    heads_first = lambda t, n: t.view(1, tokens, n, dim).transpose(1, 2)
    expected_q = heads_first(q, heads) * cos + rotate_half(heads_first(q, heads)) * sin
    caches[0][:, :, position : position + tokens] = heads_first(k, kv_heads) * cos + rotate_half(heads_first(k, kv_heads)) * sin
    caches[1][:, :, position : position + tokens] = heads_first(v, kv_heads)
    assert close(heads_first(ours_q, heads), expected_q, 1e-3)
    for ours, expected in zip(ours_caches, caches):
        assert close(ours, expected, 1e-3)
        end = position + tokens
        assert torch.equal(ours[:, :, :position], expected[:, :, :position]) and torch.equal(ours[:, :, end:], expected[:, :, end:])


@pytest.mark.cuda
def test_fused_silu_mul_matches_reference():
    gate, up = torch.randn(2, 11008, device="cuda").half() * 4, torch.randn(2, 11008, device="cuda").half()
    poison(gate.numel())
    assert close(kernels().silu_mul(gate, up), reference.silu_mul(gate, up))


def slot_tables(in_features, outs):
    # Real tables, padding slots included: mixed widths end mid-quad.
    return [layer(in_features, out, [(6, 0.3), (4, 0.45), (3, 0.25)])[1].xperm for out in outs]


@pytest.mark.cuda
@pytest.mark.parametrize("hidden, outs", [(576, (576, 192, 192)), (4096, (4096, 11008)), (8192, (1024,))])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_norm_writes_its_output_in_its_consumers_slot_orders(hidden, outs, with_residual):
    tables = slot_tables(hidden, outs)
    for rows in (1, 7):
        x = torch.randn(rows, 1, hidden, device="cuda").half()
        weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).half()
        residual = torch.randn_like(x) if with_residual else None
        x_ours, x_expected = x.clone(), x.clone()
        poison(rows * hidden * 8)
        ours = kernels().rms_norm_slots(x_ours, weight, 1e-5, residual, tables)
        expected = reference.rms_norm_slots(x_expected, weight, 1e-5, residual, tables)
        assert len(ours) == 2 + len(tables)
        # x is left as it is (several blocks read it); the sum is a new tensor.
        assert torch.equal(x_ours, x) and torch.equal(ours[0], expected[0])
        assert (ours[0].data_ptr() != x_ours.data_ptr()) == with_residual
        assert close(ours[1], expected[1], 1e-3)
        # The slots hold exactly the kernel's own output values, zeros where a slot has no input.
        for got, table in zip(ours[2:], tables):
            assert torch.equal(got, reference.slot_gather(ours[1], table))


@pytest.mark.cuda
def test_fused_silu_mul_writes_its_consumer_slot_order():
    table = slot_tables(11008, (4096,))[0]
    for rows in (1, 3):
        gate, up = torch.randn(rows, 1, 11008, device="cuda").half() * 4, torch.randn(rows, 1, 11008, device="cuda").half()
        poison(rows * table.numel())
        ours = kernels().silu_mul_slots(gate, up, table)
        assert ours.shape == (rows, table.numel())
        assert torch.equal(ours, reference.slot_gather(kernels().silu_mul(gate, up), table))
        assert close(ours, reference.silu_mul_slots(gate, up, table))


@pytest.mark.cuda
def test_slot_writers_refuse_what_they_cannot_write():
    table = slot_tables(576, (576,))[0]
    x, weight = torch.randn(1, 580, device="cuda").half(), torch.ones(580, device="cuda").half()
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernels().rms_norm_slots(x, weight, 1e-5, None, [table])
    with pytest.raises(RuntimeError, match="at most 3"):
        kernels().rms_norm_slots(x[:, :576].contiguous(), weight[:576].contiguous(), 1e-5, None, [table] * 4)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernels().silu_mul_slots(x[:, :576].contiguous(), x[:, :576].contiguous(), table[:-3])


@pytest.mark.cuda
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 128), (32, 32, 128), (4, 4, 256)])
@pytest.mark.parametrize("position,length,window", [(0, 256, 0), (130, 256, 0), (255, 256, 0), (700, 768, 0),
                                                    (700, 768, 100), (3, 256, 8), (128, 256, 1), (256, 512, 0)])
def test_decode_attention_matches_rope_then_sdpa(heads, kv_heads, dim, position, length, window):
    max_seq = 1024
    angles = torch.rand(max_seq, dim // 2, device="cuda") * 100
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().half(), angles.sin().half()
    q = torch.randn(heads * dim, device="cuda").half()
    k, v = (torch.randn(kv_heads * dim, device="cuda").half() for _ in range(2))
    caches = [torch.randn(1, kv_heads, max_seq, dim, device="cuda").half() for _ in range(2)]
    # Keys past the position hold what an earlier, longer conversation left: large, so a leak shows;
    # the token's own slot holds NaN, so reading it before the kernel writes it shows too.
    caches[0][:, :, position + 1 :] *= 50
    for cache in caches:
        cache[:, :, position] = float("nan")
    where = torch.tensor([position], device="cuda")
    # Poisoned partial sums; the arrival counts at the end start at zero, as the kernel leaves them.
    scratch = torch.full((kernels().decode_attention_scratch(heads, dim, max_seq),), float("nan"), device="cuda")
    scratch[-heads:] = 0
    expected_q, expected_caches = q.clone(), [c.clone() for c in caches]
    reference.rope_cache(expected_q, k, v, cos, sin, where, *expected_caches)  # fp16, as the kernel rounds
    expected = reference.attend(expected_q.float(), *(c.float() for c in expected_caches), where, length, window)
    ours_q = q.clone()
    # The second call also scatters its output into o_proj's slot order, as the graph decoder asks.
    table = layer(heads * dim, 64, [(6, 0.3), (4, 0.45), (3, 0.25)])[1].xperm
    for call in range(2):  # the second call finds the counts the first left
        ours_caches = [c.clone() for c in caches]
        slots = torch.zeros(1, table.numel(), dtype=torch.float16, device="cuda")
        poison(q.numel())
        ours = kernels().decode_attention(ours_q, k, v, cos, sin, where, *ours_caches, length, window, scratch,
                                          *((reference.slot_of_inputs(table), slots) if call else ()))
        assert close(ours, expected, 2e-3)
        if call:  # every output once in its slot; the slots without an input left at zero
            assert torch.equal(slots, reference.slot_gather(ours, table))
        assert torch.equal(ours_q, q), "q is read, not rotated in place"
        for mine, theirs in zip(ours_caches, expected_caches):
            assert close(mine[:, :, position], theirs[:, :, position], 1e-3)
            assert torch.equal(mine[:, :, :position], theirs[:, :, :position])
            assert torch.equal(mine[:, :, position + 1 :], theirs[:, :, position + 1 :])
    assert not scratch[-heads:].any(), "the arrival counts are left at zero"
