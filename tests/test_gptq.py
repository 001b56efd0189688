"""GPTQ on one matrix, the settings it takes, and what its output costs in bits."""

import json
import math
import warnings

import pytest
import torch

from core.formats.exl2.layout import stored_bits, unpack_q_scale, unpack_q_weight
from core.formats.exl2.reference import dequantize_exl2
from core.convert import gptq
from core.convert.gptq import accumulate_hessian, quantize_matrix, quantize_rtn, relative_error
from core.convert.qparams import (
    ATTENTION_CANDIDATES,
    ATTENTION_MODULES,
    HEAD_OPTIONS,
    MLP_CANDIDATES,
    MLP_MODULES,
    QuantSetting,
    all_candidate_settings,
    group_layout,
    setting_bits,
    setting_bpw,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py says why


IN_FEATURES = 384
OUT_FEATURES = 192


def calibration_inputs(in_features, tokens=3072, seed=0, outliers=6, outlier_gain=25.0):
    """Correlated activations with a few outlier channels, like a transformer's hidden states."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=g) / math.sqrt(in_features) + torch.eye(in_features)
    x = torch.randn(tokens, in_features, generator=g) @ mixing
    channels = torch.randperm(in_features, generator=g)[:outliers]
    x[:, channels] *= outlier_gain
    return x


@pytest.fixture(scope="module")
def hessian():
    x = calibration_inputs(IN_FEATURES)
    h = None
    for batch in x.split(1024):
        h = accumulate_hessian(h, batch)
    return h


def random_weight(seed=1, out_features=OUT_FEATURES, in_features=IN_FEATURES):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.02


def heavy_tailed_weight(seed=2):
    # A few input columns carry Student-t weights, as outlier features do in LLMs.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT_FEATURES, IN_FEATURES, generator=g) * 0.02
    columns = torch.randperm(IN_FEATURES, generator=g)[:24]
    # Student-t with 2 degrees of freedom, z / sqrt(chi2_2 / 2), from the seeded
    # generator (torch.distributions would draw from the global one, a new matrix every run).
    z, chi = torch.randn(2, OUT_FEATURES, 24, generator=g)
    t = z / torch.sqrt((chi**2 + torch.randn(OUT_FEATURES, 24, generator=g) ** 2) / 2)
    w[:, columns] = t * 0.02
    return w


def gptq_error(weight, hessian, setting, **kwargs):
    tensors = quantize_matrix(weight, hessian, setting, **kwargs)
    quantized = dequantize_exl2(tensors, weight.shape[0]).T.float()
    return relative_error(weight, quantized, hessian), tensors


def test_accumulate_hessian_sums_xtx_over_batches():
    x = calibration_inputs(64, tokens=300)
    h = accumulate_hessian(None, x[:100].view(4, 25, 64))
    h = accumulate_hessian(h, x[100:])
    assert h.dtype == torch.float32 and h.shape == (64, 64)
    assert torch.allclose(h, x.T @ x, rtol=1e-4, atol=1e-2)


def test_relative_error_is_the_output_error_on_the_calibration_inputs():
    x = calibration_inputs(96, tokens=500)
    w = random_weight(out_features=48, in_features=96)
    q = w + torch.randn_like(w) * 0.003
    direct = torch.linalg.norm(x @ (w - q).T) / torch.linalg.norm(x @ w.T)
    assert relative_error(w, q, accumulate_hessian(None, x)) == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("make_weight", [random_weight, heavy_tailed_weight], ids=["gaussian", "heavy_tailed"])
def test_gptq_beats_round_to_nearest_at_same_bits_and_group_size(bits, make_weight, hessian):
    weight = make_weight()
    setting = QuantSetting(((bits, 1.0, 128),))
    gptq, _ = gptq_error(weight, hessian, setting)
    rtn = relative_error(weight, quantize_rtn(weight, bits, 128), hessian)
    assert gptq < 0.85 * rtn, (gptq, rtn)


def test_error_falls_as_bits_rise(hessian):
    weight = random_weight()
    errors = [gptq_error(weight, hessian, QuantSetting(((b, 1.0, 128),)))[0] for b in (2, 3, 4, 5, 6, 8)]
    assert errors == sorted(errors, reverse=True)


def test_coarse_scale_search_picks_what_the_full_grid_picks(hessian, monkeypatch):
    weight = heavy_tailed_weight()
    setting = QuantSetting(((5, 0.1, 32), (3, 0.9, 64)))
    coarse = quantize_matrix(weight, hessian, setting)
    monkeypatch.setattr(gptq, "_COARSE_STEP", 1)
    full = quantize_matrix(weight, hessian, setting)
    assert all(torch.equal(coarse[name], full[name]) for name in full)


def test_act_order_beats_input_order_when_a_few_inputs_are_salient():
    # 5% of inputs carry most of the activation energy; act-order sends them to
    # the 4-bit rows and the first groups, input order scatters them.
    in_features = 256
    x = calibration_inputs(in_features, tokens=2048, seed=5, outliers=13, outlier_gain=30.0)
    h = accumulate_hessian(None, x)
    weight = random_weight(seed=6, out_features=128, in_features=in_features)
    setting = QuantSetting(((4, 0.1, 32), (2, 0.9, 32)))
    ordered, _ = gptq_error(weight, h, setting, act_order=True)
    unordered, tensors = gptq_error(weight, h, setting, act_order=False)
    assert torch.equal(tensors["q_invperm"], torch.arange(in_features, dtype=torch.int32))
    assert ordered < 0.8 * unordered, (ordered, unordered)


def test_act_order_puts_inputs_by_descending_hessian_diagonal(hessian):
    tensors = quantize_matrix(random_weight(), hessian, QuantSetting(((4, 1.0, 128),)))
    perm = torch.argsort(tensors["q_invperm"].long())
    diagonal = torch.diagonal(hessian)[perm]
    assert torch.all(diagonal[:-1] >= diagonal[1:])


def test_dead_inputs_do_not_crash_and_keep_their_weights(hessian):
    h = hessian.clone()
    dead = torch.tensor([0, 7, 100, 383])
    h[dead, :] = 0
    h[:, dead] = 0
    weight = random_weight()
    tensors = quantize_matrix(weight, h, QuantSetting(((4, 0.5, 64), (3, 0.5, 64))))
    quantized = dequantize_exl2(tensors, OUT_FEATURES).T.float()
    assert torch.isfinite(quantized).all()
    # Dead inputs sort last and are rounded on their own, not zeroed.
    assert set(torch.argsort(tensors["q_invperm"].long())[-4:].tolist()) == set(dead.tolist())
    assert torch.allclose(quantized[:, dead], weight[:, dead], atol=0.03)
    assert relative_error(weight, quantized, h) < 0.1


def test_all_inputs_dead_still_quantizes():
    weight = random_weight(out_features=64, in_features=64)
    tensors = quantize_matrix(weight, torch.zeros(64, 64), QuantSetting(((4, 1.0, 32),)))
    quantized = dequantize_exl2(tensors, 64).T.float()
    assert (quantized - weight).abs().max() < 0.01


def test_indefinite_hessian_gets_more_damping_instead_of_failing(hessian):
    # Symmetric noise with a zero diagonal: every input still looks alive, but
    # the smallest eigenvalue drops to about -3x the mean diagonal.
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(IN_FEATURES, IN_FEATURES, generator=g)
    noise = (noise + noise.T) / math.sqrt(2)
    noise.fill_diagonal_(0)
    noise *= 1.5 * float(torch.diagonal(hessian).mean()) / math.sqrt(IN_FEATURES)
    h = hessian + noise
    assert torch.linalg.eigvalsh(h.double()).min() < -torch.diagonal(hessian).mean()
    weight = random_weight()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tensors = quantize_matrix(weight, h, QuantSetting(((4, 1.0, 128),)))
    assert any("damping raised" in str(w.message) for w in caught)
    quantized = dequantize_exl2(tensors, OUT_FEATURES).T.float()
    assert torch.isfinite(quantized).all()
    assert relative_error(weight, quantized, hessian) < 0.2


def test_nan_hessian_is_refused_with_a_clear_error():
    h = torch.eye(32)
    h[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_matrix(random_weight(out_features=32, in_features=32), h, QuantSetting(((4, 1.0, 32),)))


def test_quantized_tensors_follow_the_setting_groups(hessian):
    setting = QuantSetting(((6, 0.05, 32), (3, 0.2, 64), (2, 0.75, 64)))
    tensors = quantize_matrix(random_weight(), hessian, setting)
    layout = group_layout(setting, IN_FEATURES)
    assert tensors["q_groups"].view(-1, 2)[:, 0].tolist() == [b for b, _ in layout]
    assert tensors["q_scale"].shape == (len(layout), OUT_FEATURES // 8)
    assert tensors["q_scale_max"].dtype == torch.float16 and tensors["q_scale_max"].shape == (len(layout),)
    codes = unpack_q_weight(tensors["q_weight"], tensors["q_groups"], IN_FEATURES)
    row = 0
    for bits, rows in layout:
        assert int(codes[row : row + rows].max()) < 1 << bits
        row += rows
    assert int(unpack_q_scale(tensors["q_scale"]).max()) <= 15


def test_group_layout_rounds_each_part_up_to_whole_groups():
    # 576 rows: 6 bits for ceil(28.8 / 32) = 1 group, 3 bits for ceil(115.2 / 64) = 2,
    # 2 bits for the remaining 416 rows: six groups of 64 and a last one of 32.
    setting = QuantSetting(((6, 0.05, 32), (3, 0.2, 64), (2, 0.75, 64)))
    assert group_layout(setting, 576) == [(6, 32), (3, 64), (3, 64)] + [(2, 64)] * 6 + [(2, 32)]
    # A part that the earlier parts already covered gets no group.
    assert group_layout(QuantSetting(((3, 0.05, 64), (2, 0.95, 64))), 64) == [(3, 64)]


@pytest.mark.parametrize("rows, cols", [(384, 40), (200, 64)])
def test_setting_bits_equals_stored_bits_for_every_candidate(rows, cols):
    # 200 inputs end mid-group and mid-word; 40 outputs need padding to 64.
    x = calibration_inputs(rows, tokens=600, seed=rows)
    h = accumulate_hessian(None, x)
    weight = random_weight(seed=cols, out_features=cols, in_features=rows)
    for setting in all_candidate_settings():
        tensors = quantize_matrix(weight, h, setting)
        assert stored_bits(tensors) == setting_bits(setting, rows, cols), setting.describe()


def exllamav2_total_bits(setting, rows, cols):
    """The bit count of EXL2.md / ExLlamaV2's QParams.total_bits, rewritten independently."""
    groups = group_layout(setting, rows)
    total = sum(r * cols * b for b, r in groups)
    total += len(groups) * (16 + 32 + cols * 4)
    return total + rows * 32


@pytest.mark.parametrize("rows, cols", [(4096, 4096), (11008, 4096), (4096, 11008), (576, 1536)])
def test_setting_bits_agree_with_exllamav2_accounting_on_aligned_shapes(rows, cols):
    for setting in all_candidate_settings():
        assert setting_bits(setting, rows, cols) == exllamav2_total_bits(setting, rows, cols)


def test_candidates_cover_two_to_eight_bits_per_weight():
    assert len(ATTENTION_CANDIDATES) == 20 and len(MLP_CANDIDATES) == 18
    assert all(tuple(c) == ATTENTION_MODULES for c in ATTENTION_CANDIDATES)
    assert all(tuple(c) == MLP_MODULES for c in MLP_CANDIDATES)

    def attention_bpw(candidate, hidden=4096):
        bits = sum(setting_bits(s, hidden, hidden) for s in candidate.values())
        return bits / (4 * hidden * hidden)

    def mlp_bpw(candidate, hidden=4096, intermediate=11008):
        shapes = {"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}
        bits = sum(setting_bits(s, *shapes[name]) for name, s in candidate.items())
        return bits / (3 * hidden * intermediate)

    attention = [attention_bpw(c) for c in ATTENTION_CANDIDATES]
    mlp = [mlp_bpw(c) for c in MLP_CANDIDATES]
    for costs in (attention, mlp):
        assert 2.0 < costs[0] < 2.1  # the all-2-bit floor
        assert 8.0 < costs[-1] < 8.1
        assert costs == sorted(costs)
    assert sorted(HEAD_OPTIONS) == [2, 3, 4, 5, 6, 8]
    head = [setting_bpw(HEAD_OPTIONS[b], 576, 49152) for b in sorted(HEAD_OPTIONS)]
    assert head == sorted(head)


def test_setting_dict_has_exllamav2_measurement_shape_and_survives_json():
    setting = QuantSetting(((8, 0.05, 32), (4, 0.1, 128), (3, 0.85, 128)))
    as_dict = setting.to_dict()
    assert as_dict == {"group_size": {8: 32, 4: 128, 3: 128}, "bits": [8, 4, 3], "bits_prop": [0.05, 0.1, 0.85], "scale_bits": 4}
    text = json.dumps(as_dict)
    assert json.loads(text)["group_size"] == {"8": 32, "4": 128, "3": 128}
    assert QuantSetting.from_dict(json.loads(text)) == setting
    # Older measurement files give one group size for every width.
    assert QuantSetting.from_dict({"group_size": 64, "bits": [3, 2], "bits_prop": [0.1, 0.9], "scale_bits": 4}) == QuantSetting(
        ((3, 0.1, 64), (2, 0.9, 64))
    )


@pytest.mark.parametrize(
    "parts",
    [
        ((2, 0.5, 32), (4, 0.5, 32)),  # widths must decrease
        ((4, 0.5, 48), (3, 0.5, 32)),  # group size not a multiple of 32
        ((7, 1.0, 32),),  # no 7-bit kernel
        ((4, 0.5, 32), (3, 0.4, 32)),  # proportions must sum to 1
    ],
)
def test_invalid_settings_are_refused(parts):
    with pytest.raises(ValueError):
        QuantSetting(parts)


def test_all_settings_at_once_give_what_each_gives_alone(hessian):
    # The measurement pass quantizes every candidate of a matrix in one walk
    # over its rows; the files must not depend on which candidates ran beside.
    weight = random_weight(seed=7)
    settings = list(dict.fromkeys(candidate["q_proj"] for candidate in ATTENTION_CANDIDATES))
    together = gptq.quantize_matrix_multi(weight, hessian, settings)
    for setting, stored in zip(settings, together):
        alone = quantize_matrix(weight, hessian, setting)
        assert stored.keys() == alone.keys()
        for name in alone:
            assert torch.equal(stored[name], alone[name]), (setting, name)


def test_unpacked_results_are_what_the_files_give_back(hessian):
    # The measurement pass skips packing; its weights must be the ones the
    # written files decode to, or it would measure a different model.
    weight = random_weight(seed=8)
    settings = list(dict.fromkeys(candidate["down_proj"] for candidate in MLP_CANDIDATES))
    packed = gptq.quantize_matrix_multi(weight, hessian, settings)
    dense = gptq.quantize_matrix_multi(weight, hessian, settings, packed=False)
    for setting, tensors, weights in zip(settings, packed, dense):
        assert torch.equal(weights, dequantize_exl2(tensors, OUT_FEATURES).T), setting


def test_big_matrices_walk_a_few_layouts_at_a_time_with_the_same_result(hessian, monkeypatch):
    weight = random_weight(seed=9)
    settings = list(dict.fromkeys(candidate["q_proj"] for candidate in ATTENTION_CANDIDATES))
    together = gptq.quantize_matrix_multi(weight, hessian, settings, packed=False)
    monkeypatch.setattr(gptq, "_WALK_BYTES", 3 * 2 * 4 * weight.numel())  # three layouts per walk
    in_batches = gptq.quantize_matrix_multi(weight, hessian, settings, packed=False)
    assert len(settings) > 3 and all(torch.equal(a, b) for a, b in zip(together, in_batches))


def _walk_case(seed, in_features=80, settings=3, out_features=70):
    """Random GPTQ walk inputs shaped as _gptq_rows holds them, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    work = torch.randn(in_features, settings, out_features, generator=g)
    a = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    factor = torch.linalg.cholesky(a @ a.T + torch.eye(in_features), upper=True)
    scales = torch.rand(settings, out_features, generator=g) * 0.3 + 0.05
    scales[0, :5] = 0.0  # zero scales: their weights round to code zero
    safe = torch.where(scales > 0, scales, math.inf)
    bits = torch.randint(2, 9, (in_features, settings, 1), generator=g).float()
    zero = 2 ** (bits - 1)
    tensors = dict(work=work, factor=factor, scales=scales, safe=safe, low=-zero, high=zero - 1)
    return {k: v.cuda().contiguous() for k, v in tensors.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("first,end,start,stop", [(0, 32, 0, 32), (32, 64, 32, 45), (32, 64, 45, 64), (64, 80, 70, 80)])
def test_gptq_block_kernel_matches_the_float64_reference_walk(first, end, start, stop):
    from core.kernels.build import kernels

    kernel = kernels()
    assert kernel is not None, "the CUDA kernels did not build"
    case = _walk_case(seed=first + start)
    plan = gptq._RowPlan([], {}, case["low"].double(), case["high"].double(), None, [], 0, None, None, None)
    expected = {"work": case["work"].double().clone(), "steps": torch.zeros_like(case["work"], dtype=torch.float64)}
    expected["errors"] = torch.zeros(32, *case["work"].shape[1:], dtype=torch.float64, device="cuda")
    gptq._walk(None, expected["work"], expected["steps"], expected["errors"], case["factor"].double(), plan,
               case["scales"].double(), case["safe"].double(), first, end, start, stop)

    work, steps = case["work"].clone(), torch.zeros_like(case["work"])
    errors = torch.zeros(32, *work.shape[1:], device="cuda")
    kernel.gptq_block(work, steps, errors, case["factor"], case["scales"], case["safe"], case["low"], case["high"],
                      first, end, start, stop)
    rows = slice(start, stop)
    # fp32 against fp64: a code may differ only where the weight sat on a rounding edge.
    assert (steps[rows] != expected["steps"][rows]).float().mean() < 2e-3
    same = (steps[rows] == expected["steps"][rows]).all(dim=0)
    torch.testing.assert_close(errors[start - first : stop - first][:, same], expected["errors"][start - first : stop - first][:, same].float(), rtol=1e-4, atol=1e-4)
    later = slice(stop, end)
    torch.testing.assert_close(work[later][:, same], expected["work"][later][:, same].float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(work[:start], case["work"][:start]) and torch.equal(work[end:], case["work"][end:])


@pytest.mark.cuda
def test_gptq_on_cuda_with_the_kernel_matches_the_reference_path(hessian, monkeypatch):
    # A whole matrix: the kernel's walk and the torch walk give the same codes
    # (bar rare rounding-edge flips) and the same output error.
    weight, h = random_weight(seed=3).cuda(), hessian.cuda()
    setting = ATTENTION_CANDIDATES[0]["q_proj"]
    error, with_kernel = gptq_error(weight, h, setting)
    monkeypatch.setattr(gptq, "kernels", lambda: None)
    error_ref, reference = gptq_error(weight, h, setting)
    codes = unpack_q_weight(with_kernel["q_weight"], with_kernel["q_groups"], IN_FEATURES)
    expected = unpack_q_weight(reference["q_weight"], reference["q_groups"], IN_FEATURES)
    assert (codes != expected).float().mean() < 1e-3
    assert abs(error - error_ref) <= 0.01 * error_ref


@pytest.mark.cuda
@pytest.mark.parametrize("rows,out_features", [(32, 576), (128, 1536), (16, 200), (64, 11008)])
def test_scale_search_kernel_chooses_what_the_reference_chooses(rows, out_features):
    from core.kernels.build import kernels

    kernel = kernels()
    assert kernel is not None, "the CUDA kernels did not build"
    g = torch.Generator().manual_seed(rows + out_features)
    settings_total, groups_total, first_row = 5, 9, 32
    work = torch.randn(first_row + rows + 8, settings_total, out_features, generator=g) * 0.02
    work[first_row : first_row + rows, 2, :7] *= 40  # outlier columns
    work[first_row : first_row + rows, 3, 5] = 0.0  # a dead column: code 0, its scale may round to zero
    work[first_row : first_row + rows, 4] *= 1e-6  # scales near fp16's smallest
    work = work.cuda()
    settings = torch.tensor([0, 2, 3, 4], device="cuda")
    slots = torch.tensor([4, 1, 7, 0], device="cuda")
    maxq = torch.tensor([[3.0], [15.0], [63.0], [255.0]], device="cuda")
    stretch = gptq._stretch_grid("cuda")
    plan = gptq._plan_rows((((4, 32),),), 32, "cuda")
    scale_codes = torch.full((groups_total, out_features), 99, dtype=torch.uint8, device="cuda")
    scale_maxes = torch.full((groups_total,), float("nan"), dtype=torch.float16, device="cuda")
    scales = torch.full((settings_total, out_features), float("nan"), device="cuda")
    safe, slot_scales = scales.clone(), torch.full((groups_total, out_features), float("nan"), device="cuda")
    kernel.gptq_scale_search(work, first_row, rows, settings, slots, maxq, stretch, scale_codes, scale_maxes, scales,
                             safe, slot_scales)

    blocks = work[first_row : first_row + rows].index_select(1, settings).transpose(0, 1).contiguous()
    codes, scale_max, decoded = gptq._choose_scales(blocks, maxq, stretch, plan.coarse, plan.offsets)
    assert torch.equal(scale_codes[slots], codes)
    untouched = [s for s in range(groups_total) if s not in slots.tolist()]
    assert (scale_codes[untouched] == 99).all() and scale_maxes[untouched].isnan().all()
    assert scales[1].isnan().all() and not scales[settings].isnan().any()
    # The sums run in another order than torch's, so a near tie may go the other
    # way; the scale chosen must then be as good, by the reference's own measure.
    zero = (maxq + 1) / 2
    low, high = (-zero).view(-1, 1, 1, 1), (maxq - zero).view(-1, 1, 1, 1)
    ours = gptq._stretch_errors(blocks.double(), scales[settings].double().unsqueeze(1), low, high)[:, 0]
    theirs = gptq._stretch_errors(blocks.double(), decoded.double().unsqueeze(1), low, high)[:, 0]
    assert (ours <= theirs * (1 + 1e-5) + 1e-30).all(), (ours, theirs)
    same = scale_maxes[slots] == scale_max
    torch.testing.assert_close(scales[settings][same], decoded[same], rtol=0, atol=0)
    assert torch.equal(slot_scales[slots], scales[settings])
    assert torch.equal(safe[settings], torch.where(scales[settings] > 0, scales[settings], math.inf))
