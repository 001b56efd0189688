"""Choosing one quantization setting per module group so the model meets a target bpw.

Input is the measurement pass's result, shaped like ExLlamaV2's measurement.json
`measurement` dict: module group -> candidates, each with `accuracy` (1 - relative
error of the group's output) and `total_bits` (exact bits its linears will hold).
The model's bpw is sum(chosen total_bits) / total_weights, head excluded.

Objectives (lower is better; `Allocation.predicted_error` holds the value):

- "maximin": the largest per-module error, ExLlamaV2's objective before 0.3.2
  (which bisected on a float threshold; 0.3.2 replaced it with simulated annealing
  over sum(err ** p), p picked in 1.5..3.5 to keep the max error low). Solved
  exactly here by bisection over the distinct errors, then leftover bits go to
  the best error reduction per bit.
- "sum-log": sum of log errors, i.e. the geometric mean of module errors. Halving
  any module's error is worth the same, so modules whose errors differ by orders
  of magnitude are compared on one scale; it is also the quality figure ExLlamaV2
  prints for its strategies. Caveat: when error ~ c * 2**-bpw it is
  linear in bits, so it ignores the sensitivity c and favours modules with fewer
  weights (a bpw there is cheaper); per-module weights are the way to correct that.
- "sum-sq": sum of squared relative errors. A second-order Taylor expansion of
  the loss makes its increase roughly additive over modules and quadratic in
  each module's output error (the premise of OBC's and HAWQ's allocators), so
  with weights = per-module loss sensitivity it estimates the loss increase.

Both sums are minimised exactly (multiple-choice knapsack): a Lagrangian walk
along each module's convex hull gives a lower bound and a near-optimal start,
a greedy fill spends what the walk left, and a dynamic program over
(bits, objective) Pareto states, pruned by the Lagrangian bound, closes the gap.
Near-ties (costs almost linear in bits, as sum-log makes them) can leave too many
states to prove optimality; the DP then keeps the most promising ones, which on
synthetic worst cases stayed within 0.03 of the bound in summed log error.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

OBJECTIVES = ("maximin", "sum-log", "sum-sq")
# On the demo model at 4.0 bpw maximin beats sum-sq, and sum-log starves the MLPs
# (python3 -m bench.quality --objectives maximin sum-log sum-sq; bench/RESULTS.md).
DEFAULT_OBJECTIVE = "maximin"

# A measured relative error below this is float noise of the measurement itself;
# the floor keeps log(error) finite, so one "perfect" module cannot outweigh all others.
ERROR_FLOOR = 1e-10

# Padding for modules with fewer candidates: never affordable, never an improvement.
_UNREACHABLE_BITS = 1 << 62
_MAX_CANDIDATE_BITS = 1 << 56

# Beyond this many Pareto states the DP keeps the most promising ones (a beam),
# bounding one allocation to about a second for 160 modules; noisy measurements
# stay far below it and are solved exactly.
_DP_STATE_LIMIT = 1 << 12


class AllocationError(ValueError):
    """The target cannot be met with the measured candidates."""


@dataclass(frozen=True)
class Allocation:
    choice: dict[str, int]  # module group -> index into its measurement candidates
    total_bits: int
    bpw: float
    objective: str
    predicted_error: float  # the objective's value for this choice (see module docstring)


def candidate_curve(measurement: dict[str, list[dict]], module: str) -> list[tuple[int, float]]:
    """(total_bits, error) of every candidate of `module`, by increasing bits, for plots."""
    bits, errors = _parse_candidates(module, measurement[module])
    return sorted(zip(bits, errors))


def allocate_bits(
    measurement: dict[str, list[dict]],
    total_weights: int,
    target_bpw: float,
    objective: str = DEFAULT_OBJECTIVE,
    module_weights: dict[str, float] | None = None,
) -> Allocation:
    """Pick a candidate per module minimising `objective` with bpw <= target_bpw.

    `module_weights` (default 1 each) scale each module's term: max of w*error,
    sum of w*log(error) or sum of w*error**2.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if not isinstance(total_weights, int) or total_weights <= 0:
        raise ValueError(f"total_weights must be a positive int, not {total_weights!r}")
    if not math.isfinite(target_bpw) or target_bpw <= 0:
        raise ValueError(f"target_bpw must be a positive number, not {target_bpw!r}")

    modules, bits, errors = _candidate_table(measurement)
    weights = _weight_vector(modules, module_weights)
    # Exact rational product: a float product could round up past the target by a bit.
    budget = math.floor(Fraction(target_bpw) * total_weights)

    rows = np.arange(len(modules))
    cheapest_bits = int(bits.min(axis=1).sum())
    if cheapest_bits > budget:
        min_bpw = math.ceil(Fraction(cheapest_bits, total_weights) * 10_000) / 10_000
        raise AllocationError(
            f"target {target_bpw} bpw is below the minimum reachable {min_bpw:.4f} bpw "
            f"(the cheapest candidate of every module); choose a target of at least {min_bpw:.4f}"
        )

    costs = _module_costs(objective, errors, weights)
    # Most accurate, and the cheaper of equally accurate ones.
    most_accurate = _argmin_lex(errors, bits)
    if int(bits[rows, most_accurate].sum()) <= budget:
        choice = most_accurate
    elif objective == "maximin":
        choice = _solve_maximin(bits, costs, budget)
    else:
        choice, _ = _solve_separable_sum(bits, costs, budget)

    chosen_costs = costs[rows, choice]
    total_bits = int(bits[rows, choice].sum())
    return Allocation(
        choice={module: int(index) for module, index in zip(modules, choice)},
        total_bits=total_bits,
        bpw=total_bits / total_weights,
        objective=objective,
        predicted_error=float(chosen_costs.max() if objective == "maximin" else chosen_costs.sum()),
    )


# ---------------------------------------------------------------- input


def _parse_candidates(module: str, candidates: list[dict]) -> tuple[list[int], list[float]]:
    if not candidates:
        raise ValueError(f"module {module!r} has no measured candidates")
    bits, errors = [], []
    for index, candidate in enumerate(candidates):
        try:
            accuracy = float(candidate["accuracy"])
            total_bits = candidate["total_bits"]
            whole_bits = int(total_bits) == total_bits
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{module!r} candidate {index}: needs numeric 'accuracy' and 'total_bits'") from exc
        if not math.isfinite(accuracy):
            raise ValueError(f"{module!r} candidate {index}: accuracy is {accuracy}")
        if not whole_bits or not 0 <= total_bits < _MAX_CANDIDATE_BITS:
            raise ValueError(f"{module!r} candidate {index}: total_bits {total_bits!r} is not a plausible bit count")
        bits.append(int(total_bits))
        errors.append(max(1.0 - accuracy, ERROR_FLOOR))
    return bits, errors


def _candidate_table(measurement: dict[str, list[dict]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Modules in measurement order, and [modules, max candidates] bits and errors, padded."""
    if not measurement:
        raise ValueError("measurement is empty")
    modules = list(measurement)
    parsed = [_parse_candidates(module, measurement[module]) for module in modules]
    width = max(len(b) for b, _ in parsed)
    bits = np.full((len(modules), width), _UNREACHABLE_BITS, dtype=np.int64)
    errors = np.full((len(modules), width), np.inf)
    for row, (b, e) in enumerate(parsed):
        bits[row, : len(b)] = b
        errors[row, : len(e)] = e
    return modules, bits, errors


def _weight_vector(modules: list[str], module_weights: dict[str, float] | None) -> np.ndarray:
    module_weights = module_weights or {}
    unknown = set(module_weights) - set(modules)
    if unknown:
        raise ValueError(f"module_weights names modules not in the measurement: {sorted(unknown)[:5]}")
    weights = np.array([float(module_weights.get(module, 1.0)) for module in modules])
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("module_weights must be finite and >= 0")
    return weights


def _module_costs(objective: str, errors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each candidate's weighted term of the objective."""
    transform = {"maximin": lambda e: e, "sum-log": np.log, "sum-sq": np.square}[objective]
    with np.errstate(invalid="ignore"):
        per_candidate = transform(errors)
        # Padding stays +inf even for a zero weight (0 * inf would be nan).
        return np.where(np.isfinite(errors), weights[:, None] * per_candidate, np.inf)


def _argmin_lex(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Per row, the column with the smallest `primary`, ties to the smallest `secondary`."""
    best = primary.min(axis=1, keepdims=True)
    return np.where(primary == best, secondary, _UNREACHABLE_BITS).argmin(axis=1)


# ---------------------------------------------------------------- maximin


def _solve_maximin(bits: np.ndarray, errors: np.ndarray, budget: int) -> np.ndarray:
    """Exact min over choices of max error, O(N log N) for N candidates in all."""
    thresholds = np.unique(errors[np.isfinite(errors)])

    def cheapest_within(threshold: float) -> np.ndarray:
        # Cheapest candidate at or under the threshold, the more accurate on equal bits.
        allowed_bits = np.where(errors <= threshold, bits, _UNREACHABLE_BITS)
        allowed_errors = np.where(errors <= threshold, errors, np.inf)
        return _argmin_lex(allowed_bits, allowed_errors)

    rows = np.arange(bits.shape[0])
    # Below every module's smallest error no choice exists; the caller checked the top one fits.
    low = int(np.searchsorted(thresholds, errors.min(axis=1).max()))
    high = len(thresholds) - 1
    while low < high:
        middle = (low + high) // 2
        if bits[rows, cheapest_within(thresholds[middle])].sum() <= budget:
            high = middle
        else:
            low = middle + 1
    return _fill_greedily(cheapest_within(thresholds[low]), bits, errors, budget)


# ---------------------------------------------------------------- shared


def _fill_greedily(choice: np.ndarray, bits: np.ndarray, costs: np.ndarray, budget: int) -> np.ndarray:
    """Spend leftover bits on the upgrade with the best cost reduction per bit until none fits."""
    choice = choice.copy()
    rows = np.arange(bits.shape[0])
    while True:
        current_bits = bits[rows, choice]
        extra_bits = bits - current_bits[:, None]
        gain = costs[rows, choice][:, None] - costs
        affordable = (gain > 0) & (extra_bits <= budget - current_bits.sum())
        if not affordable.any():
            return choice
        with np.errstate(divide="ignore", invalid="ignore"):
            # An upgrade that costs no bits is taken first: it can only help.
            per_bit = np.where(extra_bits > 0, gain / extra_bits, np.inf)
        per_bit = np.where(affordable, per_bit, -np.inf)
        row, column = np.unravel_index(np.argmax(per_bit), per_bit.shape)
        choice[row] = column


# ---------------------------------------------------------------- separable sums


def _lower_hull(bits: np.ndarray, costs: np.ndarray) -> list[int]:
    """Candidate columns on one module's lower convex hull of (bits, cost), by increasing bits."""
    finite = np.flatnonzero(np.isfinite(costs))
    hull: list[int] = []
    for column in finite[np.lexsort((costs[finite], bits[finite]))]:
        b, c = int(bits[column]), float(costs[column])
        if hull and c >= costs[hull[-1]]:
            continue  # dominated: more bits and no better
        while len(hull) >= 2:
            b1, c1 = int(bits[hull[-2]]), float(costs[hull[-2]])
            b2, c2 = int(bits[hull[-1]]), float(costs[hull[-1]])
            # Middle point on or above the chord from hull[-2] to this one: not on the hull.
            if (c2 - c1) * (b - b1) >= (c - c1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(int(column))
    return hull


def _lagrangian_walk(bits: np.ndarray, costs: np.ndarray, budget: int) -> tuple[np.ndarray, float]:
    """Greedy walk along the convex hulls: the LP relaxation's integral part, and its multiplier.

    Equivalent to bisecting on the multiplier, but exact: the multiplier can only
    be one of the hull slopes, so the walk visits them in order instead.
    """
    hulls = [_lower_hull(bits[row], costs[row]) for row in range(bits.shape[0])]
    position = [0] * len(hulls)
    choice = np.array([hull[0] for hull in hulls])
    left = budget - int(bits[np.arange(len(hulls)), choice].sum())

    def next_step(row: int):
        hull, at = hulls[row], position[row]
        if at + 1 >= len(hull):
            return None
        extra = int(bits[row, hull[at + 1]] - bits[row, hull[at]])
        gain = float(costs[row, hull[at]] - costs[row, hull[at + 1]])
        return (-gain / extra, row, extra)

    steps = [step for step in map(next_step, range(len(hulls))) if step is not None]
    heapq.heapify(steps)
    while steps:
        negative_slope, row, extra = heapq.heappop(steps)
        if extra > left:
            return choice, -negative_slope
        left -= extra
        position[row] += 1
        choice[row] = hulls[row][position[row]]
        step = next_step(row)
        if step is not None:
            heapq.heappush(steps, step)
    return choice, 0.0


def _solve_separable_sum(bits: np.ndarray, costs: np.ndarray, budget: int) -> tuple[np.ndarray, bool]:
    """Minimise sum of costs[row, choice[row]] with total bits <= budget.

    Returns the choice and whether it is proven optimal (False only if the DP
    outgrew its state limit and fell back to a beam).
    """
    modules = bits.shape[0]
    rows = np.arange(modules)
    relaxed, multiplier = _lagrangian_walk(bits, costs, budget)
    incumbent = _fill_greedily(relaxed, bits, costs, budget)
    incumbent_cost = float(costs[rows, incumbent].sum())

    # Lagrangian dual: sum over modules of min(cost + multiplier * bits) - multiplier * budget
    # bounds every feasible choice from below; a candidate's reduced cost (its excess over
    # its module's minimum) is the least it can add above that bound.
    priced = np.where(np.isfinite(costs), costs + multiplier * bits.astype(np.float64), np.inf)
    module_floor = priced.min(axis=1)
    lower_bound = float(module_floor.sum() - multiplier * budget)
    reduced = priced - module_floor[:, None]
    scale = float(np.abs(np.where(np.isfinite(costs), costs, 0.0)).max(axis=1).sum()) + 1.0
    tolerance = 1e-12 * scale
    gap = incumbent_cost - lower_bound
    if gap <= tolerance:
        return incumbent, True

    # Only candidates whose reduced cost fits in the gap can be in a better choice.
    core = [np.flatnonzero(reduced[row] <= gap + tolerance) for row in range(modules)]
    floor_after = np.append(np.cumsum(module_floor[::-1])[::-1], 0.0)[1:]
    min_bits_after = np.append(np.cumsum([bits[row, core[row]].min() for row in range(modules)][::-1])[::-1], 0)[1:]

    state_bits = np.zeros(1, dtype=np.int64)
    state_cost = np.zeros(1)
    parents, columns = [], []
    proven = True
    for row in range(modules):
        candidate_bits, candidate_costs = bits[row, core[row]], costs[row, core[row]]
        new_bits = (state_bits[:, None] + candidate_bits[None, :]).ravel()
        new_cost = (state_cost[:, None] + candidate_costs[None, :]).ravel()
        bound = new_cost + multiplier * new_bits + floor_after[row] - multiplier * budget
        keep = (new_bits + min_bits_after[row] <= budget) & (bound < incumbent_cost - tolerance)
        kept = np.flatnonzero(keep)
        if kept.size == 0:
            return incumbent, proven
        # Pareto front: by bits, keep only states cheaper in cost than every state with fewer bits.
        order = kept[np.lexsort((new_cost[kept], new_bits[kept]))]
        sorted_cost = new_cost[order]
        running_min = np.minimum.accumulate(sorted_cost)
        front = np.ones(order.size, dtype=bool)
        front[1:] = sorted_cost[1:] < running_min[:-1]
        order = order[front]
        if order.size > _DP_STATE_LIMIT:
            proven = False
            order = order[np.argsort(bound[order], kind="stable")[:_DP_STATE_LIMIT]]
        parent, column = np.divmod(order, candidate_bits.size)
        parents.append(parent)
        columns.append(core[row][column])
        state_bits, state_cost = new_bits[order], new_cost[order]

    state = int(np.argmin(state_cost))
    if state_cost[state] >= incumbent_cost - tolerance:
        return incumbent, proven
    choice = np.empty(modules, dtype=np.int64)
    for row in range(modules - 1, -1, -1):
        choice[row] = columns[row][state]
        state = int(parents[row][state])
    return choice, proven
