import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from core.convert.allocate import (
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    Allocation,
    AllocationError,
    _candidate_table,
    _solve_separable_sum,
    allocate_bits,
    candidate_curve,
)

HIDDEN, INTERMEDIATE, KV = 2048, 5632, 256
MODULE_WEIGHTS = {"self_attn": 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV, "mlp": 3 * HIDDEN * INTERMEDIATE}
TARGETS = [round(2.2 + 0.13 * step, 2) for step in range(44)]  # 2.2 .. 7.79
TARGETS.append(7.9)


def realistic_measurement(layers=30, seed=0, noise=0.08):
    """Shaped like a real measurement: 15-20 candidates from 2.1 to 8 bpw per module, error ~ c * 2**-bpw
    with sensitivities c spread 100x, multiplicative noise and a few dominated candidates."""
    rng = np.random.default_rng(seed)
    measurement = {}
    for layer in range(layers):
        for kind, weights in MODULE_WEIGHTS.items():
            count = int(rng.integers(15, 21))
            bpw = np.sort(np.linspace(2.1, 8.0, count) + rng.uniform(-0.05, 0.05, count))
            errors = 10 ** rng.uniform(-1.5, 0.5) * 2.0**-bpw * np.exp(rng.normal(0, noise, count))
            for worse in rng.choice(np.arange(1, count), size=2, replace=False):
                errors[worse] = errors[worse - 1] * 1.3  # more bits, no better: dominated
            overhead = HIDDEN * 32 + int(weights * 0.02)
            measurement[f"model.layers.{layer}.{kind}"] = [
                {"accuracy": 1.0 - float(e), "total_bits": int(b * weights) + overhead, "q_proj": {"bits": [4]}}
                for b, e in zip(bpw, errors)
            ]
    return measurement, layers * sum(MODULE_WEIGHTS.values())


def chosen(measurement, allocation, key):
    return [measurement[module][index][key] for module, index in allocation.choice.items()]


def objective_value(objective, errors):
    errors = np.asarray(errors)
    if objective == "maximin":
        return float(np.max(errors))
    if objective == "sum-log":
        return float(np.sum(np.log(errors)))
    return float(np.sum(errors**2))


def errors_of(measurement, allocation):
    return [1.0 - accuracy for accuracy in chosen(measurement, allocation, "accuracy")]


@pytest.fixture(scope="module")
def realistic():
    measurement, total_weights = realistic_measurement()
    allocations = {
        (objective, target): allocate_bits(measurement, total_weights, target, objective)
        for objective in OBJECTIVES
        for target in TARGETS
    }
    return measurement, total_weights, allocations


def test_never_exceeds_the_target_and_lands_within_005_bpw(realistic):
    measurement, total_weights, allocations = realistic
    for (objective, target), allocation in allocations.items():
        assert allocation.total_bits == sum(chosen(measurement, allocation, "total_bits"))
        assert allocation.total_bits <= math.floor(Fraction(target) * total_weights)
        assert allocation.bpw <= target
        assert target - allocation.bpw < 0.05, (objective, target, allocation.bpw)
        assert allocation.objective == objective
        assert set(allocation.choice) == set(measurement)


def test_maximin_has_the_smallest_max_error_and_the_sums_their_smallest_sums(realistic):
    measurement, _, allocations = realistic
    for target in TARGETS:
        by_objective = {objective: allocations[objective, target] for objective in OBJECTIVES}
        for objective, allocation in by_objective.items():
            assert allocation.predicted_error == pytest.approx(objective_value(objective, errors_of(measurement, allocation)))
        for objective in OBJECTIVES:
            best = by_objective[objective].predicted_error
            for other in by_objective.values():
                assert best <= objective_value(objective, errors_of(measurement, other)) + 1e-9 * abs(best), (objective, target)


def test_sum_objectives_are_proven_optimal_on_a_realistic_measurement(realistic):
    measurement, total_weights, _ = realistic
    _, bits, errors = _candidate_table(measurement)
    for costs in (np.log(errors), errors**2):
        for target in TARGETS[::4]:
            _, proven = _solve_separable_sum(bits, costs, math.floor(target * total_weights))
            assert proven


def test_noiseless_exponential_errors_still_meet_the_target():
    # log(error) exactly linear in bits ties almost every choice: the worst case for the DP's state count.
    measurement, total_weights = realistic_measurement(layers=12, noise=0.0)
    for target in (2.5, 4.0, 6.5):
        allocation = allocate_bits(measurement, total_weights, target, "sum-log")
        assert target - 0.05 < allocation.bpw <= target


def test_a_higher_target_never_gives_a_worse_objective(realistic):
    _, _, allocations = realistic
    for objective in OBJECTIVES:
        values = [allocations[objective, target].predicted_error for target in TARGETS]
        for lower, higher in zip(values, values[1:]):
            assert higher <= lower + 1e-12 * abs(lower), objective


def random_small_measurement(rng, modules, candidates):
    measurement = {}
    for module in range(modules):
        bits = rng.integers(1_000, 9_000, candidates)
        errors = rng.uniform(0.001, 0.2, candidates)  # unsorted: many candidates are dominated
        measurement[f"m{module}"] = [{"accuracy": 1.0 - e, "total_bits": int(b)} for b, e in zip(bits, errors)]
    return measurement


def every_combination(measurement):
    """Total bits and each objective's value of every possible choice."""
    columns = [
        (np.array([c["total_bits"] for c in candidates]), np.array([1.0 - c["accuracy"] for c in candidates]))
        for candidates in measurement.values()
    ]
    combos = np.array(list(itertools.product(*[range(len(b)) for b, _ in columns])))
    bits = sum(b[combos[:, row]] for row, (b, _) in enumerate(columns))
    errors = np.stack([e[combos[:, row]] for row, (_, e) in enumerate(columns)], axis=1)
    values = {"maximin": errors.max(axis=1), "sum-log": np.log(errors).sum(axis=1), "sum-sq": (errors**2).sum(axis=1)}
    return bits, values


@pytest.mark.parametrize("modules, candidates, seeds", [(3, 4, 40), (6, 5, 6)])
def test_every_objective_matches_brute_force_on_small_cases(modules, candidates, seeds):
    rng = np.random.default_rng(1)
    total_weights = 1_000 * modules
    for _ in range(seeds):
        measurement = random_small_measurement(rng, modules, candidates)
        cheapest = sum(min(c["total_bits"] for c in m) for m in measurement.values())
        dearest = sum(max(c["total_bits"] for c in m) for m in measurement.values())
        combination_bits, combination_values = every_combination(measurement)
        for total in np.linspace(cheapest, dearest, 12):
            target = (float(total) + 0.5) / total_weights  # the half bit keeps float rounding off the cheapest total
            feasible = combination_bits <= math.floor(Fraction(target) * total_weights)
            for objective in OBJECTIVES:
                allocation = allocate_bits(measurement, total_weights, target, objective)
                best = combination_values[objective][feasible].min()
                assert allocation.bpw <= target
                assert allocation.predicted_error == pytest.approx(best, rel=1e-12, abs=1e-15), (objective, target)


def test_a_budget_met_exactly_is_allowed_and_one_bit_less_is_not():
    measurement = {
        "a": [{"accuracy": 0.9, "total_bits": 300}, {"accuracy": 0.99, "total_bits": 700}],
        "b": [{"accuracy": 0.9, "total_bits": 300}, {"accuracy": 0.99, "total_bits": 700}],
    }
    for objective in OBJECTIVES:
        assert allocate_bits(measurement, 1000, 1.0, objective).total_bits == 1000
        assert allocate_bits(measurement, 1000, 0.999, objective).total_bits == 600
        with pytest.raises(AllocationError):
            allocate_bits(measurement, 1000, 0.599, objective)


def test_an_unreachable_target_names_the_minimum_reachable_bpw(realistic):
    measurement, total_weights, _ = realistic
    cheapest = sum(min(c["total_bits"] for c in candidates) for candidates in measurement.values())
    minimum = cheapest / total_weights
    for objective in OBJECTIVES:
        with pytest.raises(AllocationError, match=rf"minimum reachable {math.ceil(minimum * 1e4) / 1e4:.4f} bpw"):
            allocate_bits(measurement, total_weights, minimum - 0.01, objective)
        allocate_bits(measurement, total_weights, math.ceil(minimum * 1e4) / 1e4, objective)


def test_a_target_above_the_dearest_choice_gets_the_most_accurate_candidates(realistic):
    measurement, total_weights, _ = realistic
    most_accurate = {module: int(np.argmax([c["accuracy"] for c in candidates])) for module, candidates in measurement.items()}
    for objective in OBJECTIVES:
        allocation = allocate_bits(measurement, total_weights, 9.0, objective)
        assert allocation.choice == most_accurate


def test_module_weight_moves_bits_to_the_weighted_module(realistic):
    measurement, total_weights, _ = realistic
    module = "model.layers.7.mlp"
    for objective in OBJECTIVES:
        plain = allocate_bits(measurement, total_weights, 4.0, objective)
        weighted = allocate_bits(measurement, total_weights, 4.0, objective, module_weights={module: 20.0})
        bits_of = lambda allocation: measurement[module][allocation.choice[module]]["total_bits"]
        assert bits_of(weighted) > bits_of(plain), objective
        assert weighted.bpw <= 4.0
        ignored = allocate_bits(measurement, total_weights, 4.0, objective, module_weights={module: 0.0})
        assert bits_of(ignored) == min(c["total_bits"] for c in measurement[module]), objective


def test_candidate_curve_lists_bits_and_error_by_increasing_bits():
    measurement = {"m": [{"accuracy": 0.99, "total_bits": 800}, {"accuracy": 0.9, "total_bits": 200}]}
    curve = candidate_curve(measurement, "m")
    assert [bits for bits, _ in curve] == [200, 800]
    assert [error for _, error in curve] == pytest.approx([0.1, 0.01])


def test_bad_inputs_are_rejected_with_the_reason():
    measurement = {"m": [{"accuracy": 0.9, "total_bits": 200}]}
    assert DEFAULT_OBJECTIVE in OBJECTIVES
    with pytest.raises(ValueError, match="objective"):
        allocate_bits(measurement, 100, 4.0, "mean")
    with pytest.raises(ValueError, match="no measured candidates"):
        allocate_bits({"m": []}, 100, 4.0)
    for bad_bits in (2.5, None, -8):
        with pytest.raises(ValueError, match="total_bits"):
            allocate_bits({"m": [{"accuracy": 0.9, "total_bits": bad_bits}]}, 100, 4.0)
    with pytest.raises(ValueError, match="not in the measurement"):
        allocate_bits(measurement, 100, 4.0, module_weights={"x": 2.0})
    assert isinstance(allocate_bits(measurement, 100, 4.0), Allocation)
