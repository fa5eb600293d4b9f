"""The 0/1 program of the search: one rule per head under a density budget at every length.

    minimise    sum_l w_l * sum_{u,r} loss[l, u, r] x[u, r]
    subject to  sum_r x[u, r] = 1                                  every unit u (head of the plan)
                mean cost at length n  <= budget                   every budget length n
                mean cost at length n  >= lower                    (optional)
                sum_{u,r} loss[l, u, r] x[u, r] <= eps_l           (optional, epsilon constraints)
                distinct rules in a layer <= K                     (optional)

A unit is a KV head (granularity kv_head, losses summed over its query heads) or a query
head (query_head). With query_head and KV density, the cost of a GQA group of `group`
query heads is the density of the group's *largest* span, what its shared cache holds:
continuous auxiliary variables z[n, g] >= density of every member's rule at n carry that
max, and the budget bounds sum_g z[n, g]. A set of choices is feasible iff the true
group maxima meet the budget, since z can always be set to the max. (The optional lower
bound is put on the mean per-query-head density in that case: the maxima cannot be bounded
from below through z; max >= mean, so the cache respects the lower bound too.)

The model is built once as (c, A, row bounds, integrality) and handed unchanged to
HiGHS (scipy.optimize.milp) or CBC (pulp), so both solve the same program.
The objective is divided by one constant and each epsilon row by its length's loss scale
before solving (solver tolerances are absolute); the optimum is unchanged and results are
reported in the caller's units.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .plan import PlanError
from .rules import check_density

SOLVERS = ("highs", "cbc")


class SearchError(PlanError):
    """The search cannot produce a plan (infeasible budget, bad inputs); the message says why."""


@dataclass
class Problem:
    """Everything the program needs, in plain arrays.

    loss:    float64 [m, U, R]  loss of rule r for unit u at profiled length l (>= 0)
    density: float64 [n, R]     density of rule r at each budget length (profiled + extend)
    budget_lengths: n lengths, for messages
    loss_lengths:   m profiled lengths, for messages
    layers:  number of layers; units are laid out layer-major (U = layers * units per layer)
    group:   units whose cost is the max over them (query_head + KV density), else 1
    """

    loss: np.ndarray
    density: np.ndarray
    budget: float
    budget_lengths: list[int]
    loss_lengths: list[int]
    layers: int
    group: int = 1
    lower: float | None = None
    max_rules_per_layer: int | None = None
    kind: str = "kv"

    def __post_init__(self):
        self.loss = np.asarray(self.loss, dtype=np.float64)
        self.density = np.asarray(self.density, dtype=np.float64)
        m, U, R = self.loss.shape
        if self.density.shape != (len(self.budget_lengths), R):
            raise SearchError(f"density table has shape {self.density.shape}, expected "
                              f"({len(self.budget_lengths)} budget lengths, {R} rules)")
        if len(self.loss_lengths) != m:
            raise SearchError(f"loss table has {m} lengths, loss_lengths names {len(self.loss_lengths)}")
        if U % self.layers or (U // self.layers) % self.group:
            raise SearchError(f"{U} units do not split into {self.layers} layers of whole groups of {self.group}")
        if not np.all(np.isfinite(self.loss)):
            raise SearchError("loss table has non-finite values (NaN/inf in the profile?)")
        try:
            self.budget = check_density(self.budget, "budget")
        except ValueError as e:
            raise SearchError(str(e)) from None
        if self.lower is not None and not 0 <= self.lower <= self.budget:
            raise SearchError(f"lower bound {self.lower} must lie in [0, budget={self.budget}]")
        if self.max_rules_per_layer is not None and self.max_rules_per_layer < 1:
            raise SearchError(f"max rules per layer must be >= 1, got {self.max_rules_per_layer}")

    @property
    def units(self) -> int:
        return self.loss.shape[1]

    @property
    def rules(self) -> int:
        return self.loss.shape[2]

    def losses(self, choice: np.ndarray) -> np.ndarray:
        """[m] loss of a choice (int [U] rule index per unit) at each profiled length."""
        return self.loss[:, np.arange(self.units), choice].sum(-1)

    def densities(self, choice: np.ndarray) -> np.ndarray:
        """[n] true average cost of a choice at each budget length (group max where group > 1)."""
        d = self.density[:, choice]                                   # [n, U]
        return d.reshape(d.shape[0], -1, self.group).max(-1).mean(-1)

    def distinct_per_layer(self, choice: np.ndarray) -> np.ndarray:
        return np.array([len(set(row.tolist())) for row in choice.reshape(self.layers, -1)])


@dataclass
class Solution:
    """One solve. status: 'optimal', 'time_limit' (feasible, not proven optimal), 'infeasible',
    'failed' (no solution: time limit without an incumbent, or a solver error)."""

    status: str
    solver: str
    seconds: float
    choice: np.ndarray | None = None          # int [U]
    objective: float | None = None            # in the caller's loss units
    gap: float | None = None                  # relative MIP gap reported by the solver
    message: str = ""
    losses: np.ndarray | None = None          # [m]
    densities: np.ndarray | None = None       # [n]

    @property
    def feasible(self) -> bool:
        return self.choice is not None


@dataclass
class _Model:
    c: np.ndarray
    A: sp.csr_matrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    integer: np.ndarray      # 1 = binary, 0 = continuous
    var_hi: np.ndarray
    n_x: int
    scale: np.ndarray = field(default_factory=lambda: np.ones(1))


def loss_scale(problem: Problem) -> np.ndarray:
    """[m] per-length scale: the loss of the worst choice (every unit's costliest rule), 1 if zero."""
    s = problem.loss.max(-1).sum(-1)
    return np.where(s > 0, s, 1.0)


def build(problem: Problem, weights, eps=None) -> _Model:
    """The program as sparse arrays. weights: [m] objective weights on the per-length losses;
    eps: [m] upper bounds on each length's loss (np.inf / None = none); both in the caller's units."""
    m, U, R = problem.loss.shape
    n = len(problem.budget_lengths)
    g = problem.group
    G = U // g
    scale = loss_scale(problem)
    loss = problem.loss / scale[:, None, None]
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), (m,))
    n_x = U * R
    n_z = n * G if g > 1 else 0
    lay_units = U // problem.layers
    K = problem.max_rules_per_layer
    use_u = K is not None and K < min(R, lay_units)
    n_u = problem.layers * R if use_u else 0
    n_var = n_x + n_z + n_u

    c = np.zeros(n_var)
    c[:n_x] = np.tensordot(weights, problem.loss, axes=1).ravel()
    c_max = np.abs(c).max()
    if c_max > 0:  # one global factor: the optimum is unchanged, the solver's tolerances fit
        c /= c_max
    rows, cols, vals, lo, hi = [], [], [], [], []
    r0 = 0

    def add(rr, cc, vv, lo_, hi_):
        nonlocal r0
        rows.append(np.asarray(rr) + r0)
        cols.append(np.asarray(cc))
        vals.append(np.asarray(vv, dtype=np.float64))
        lo.append(np.asarray(lo_, dtype=np.float64))
        hi.append(np.asarray(hi_, dtype=np.float64))
        r0 += len(np.atleast_1d(lo_))

    xi = np.arange(n_x).reshape(U, R)
    # one rule per unit
    add(np.repeat(np.arange(U), R), xi.ravel(), np.ones(n_x), np.ones(U), np.ones(U))
    # budget at every length
    if g == 1:
        dens = np.broadcast_to(problem.density[:, None, :], (n, U, R)).reshape(n, n_x) / U
        lo_b = np.full(n, problem.lower if problem.lower is not None else -np.inf)
        add(np.repeat(np.arange(n), n_x), np.tile(np.arange(n_x), n), dens.ravel(), lo_b, np.full(n, problem.budget))
    else:
        zi = n_x + np.arange(n_z).reshape(n, G)
        # z[l, group(u)] - sum_r d[l, r] x[u, r] >= 0   for every length l and unit u
        for li in range(n):
            rr = np.concatenate([np.repeat(np.arange(U), R), np.arange(U)])
            cc = np.concatenate([xi.ravel(), zi[li, np.arange(U) // g]])
            vv = np.concatenate([np.tile(-problem.density[li], U), np.ones(U)])
            add(rr, cc, vv, np.zeros(U), np.full(U, np.inf))
        # mean over groups of z <= budget
        add(np.repeat(np.arange(n), G), zi.ravel(), np.full(n_z, 1.0 / G), np.full(n, -np.inf), np.full(n, problem.budget))
        if problem.lower is not None:
            dens = np.broadcast_to(problem.density[:, None, :], (n, U, R)).reshape(n, n_x) / U
            add(np.repeat(np.arange(n), n_x), np.tile(np.arange(n_x), n), dens.ravel(),
                np.full(n, problem.lower), np.full(n, np.inf))
    # epsilon constraints on the other lengths' losses
    if eps is not None:
        eps = np.asarray([np.inf if e is None else e for e in eps], dtype=np.float64)
        for li in np.flatnonzero(np.isfinite(eps)):
            add(np.zeros(n_x, dtype=np.int64), np.arange(n_x), loss[li].ravel(), [-np.inf], [eps[li] / scale[li]])
    # distinct rules per layer: x[u, r] <= used[layer(u), r], sum_r used[layer, r] <= K
    if use_u:
        ui = n_x + n_z + np.arange(n_u).reshape(problem.layers, R)
        layer_of = np.arange(U) // lay_units
        rr = np.concatenate([np.arange(n_x), np.arange(n_x)])
        cc = np.concatenate([xi.ravel(), ui[layer_of].ravel()])
        vv = np.concatenate([np.ones(n_x), -np.ones(n_x)])
        add(rr, cc, vv, np.full(n_x, -np.inf), np.zeros(n_x))
        add(np.repeat(np.arange(problem.layers), R), ui.ravel(), np.ones(n_u),
            np.full(problem.layers, -np.inf), np.full(problem.layers, float(K)))
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r0, n_var))
    integer = np.zeros(n_var)
    integer[:n_x] = 1
    integer[n_x + n_z:] = 1
    var_hi = np.ones(n_var)
    var_hi[n_x:n_x + n_z] = np.inf
    return _Model(c, A, np.concatenate(lo), np.concatenate(hi), integer, var_hi, n_x, scale)


def solve(problem: Problem, weights, eps=None, solver: str = "highs", time_limit: float | None = None,
          mip_gap: float = 1e-3) -> Solution:
    """Solve the program once. Never raises on infeasible/time-limited solves: the status says.

    weights: [m] objective weights on the per-length losses; eps: [m] bounds (inf = none).
    mip_gap: relative optimality gap at which the solver may stop (0 = prove optimality).
    """
    if solver not in SOLVERS:
        raise SearchError(f"solver must be one of {SOLVERS}, got {solver!r}")
    model = build(problem, weights, eps)
    t0 = time.perf_counter()
    if solver == "highs":
        sol = _solve_highs(model, time_limit, mip_gap)
    else:
        sol = _solve_cbc(model, time_limit, mip_gap)
    sol.seconds = time.perf_counter() - t0
    if sol.choice is not None:
        sol.losses = problem.losses(sol.choice)
        sol.densities = problem.densities(sol.choice)
        sol.objective = float(np.dot(np.broadcast_to(np.asarray(weights, dtype=np.float64), sol.losses.shape), sol.losses))
    return sol


def _decode(x, model: _Model, R: int) -> np.ndarray:
    """Binary x -> rule index per unit; checks the one-hot rows really hold."""
    xs = np.asarray(x[:model.n_x]).reshape(-1, R)
    choice = xs.argmax(-1)
    if not np.allclose(xs.sum(-1), 1, atol=1e-4) or not np.allclose(xs.max(-1), 1, atol=1e-4):
        raise SearchError("solver returned a solution that is not one rule per head (numerical trouble)")
    return choice


def _rules_of(model: _Model) -> int:
    # the first U rows are the one-hot rows, each with R entries
    return int(model.A.indptr[1] - model.A.indptr[0])


def _solve_highs(model: _Model, time_limit, mip_gap) -> Solution:
    from scipy.optimize import Bounds, LinearConstraint, milp

    opts = {"disp": False, "mip_rel_gap": float(mip_gap)}
    if time_limit is not None:
        opts["time_limit"] = float(time_limit)
    try:
        res = milp(model.c, constraints=LinearConstraint(model.A, model.row_lo, model.row_hi),
                   integrality=model.integer, bounds=Bounds(np.zeros_like(model.var_hi), model.var_hi), options=opts)
    except Exception as e:  # a solver crash is reported, not raised
        return Solution("failed", "highs", 0.0, message=f"HiGHS error: {e}")
    gap = getattr(res, "mip_gap", None)
    gap = None if gap is None or not np.isfinite(gap) else float(gap)
    if res.status == 2:
        return Solution("infeasible", "highs", 0.0, message=res.message)
    if res.x is None:
        status = "failed"
        msg = res.message if res.status != 1 else f"time limit reached with no feasible plan found ({res.message})"
        return Solution(status, "highs", 0.0, gap=gap, message=msg)
    status = "optimal" if res.status == 0 else "time_limit"
    return Solution(status, "highs", 0.0, choice=_decode(res.x, model, _rules_of(model)), gap=gap, message=res.message)


def _solve_cbc(model: _Model, time_limit, mip_gap) -> Solution:
    import pulp

    prob = pulp.LpProblem("moa_search", pulp.LpMinimize)
    # pulp >= 3.3 attaches variables to the model; older pulp constructs them directly
    new_var = prob.add_variable if hasattr(prob, "add_variable") else pulp.LpVariable
    xs = [new_var(f"v{i}", 0, None if np.isinf(hi) else float(hi),
                  pulp.LpBinary if (integ and hi == 1) else (pulp.LpInteger if integ else pulp.LpContinuous))
          for i, (integ, hi) in enumerate(zip(model.integer, model.var_hi))]
    prob += pulp.LpAffineExpression([(xs[i], float(v)) for i, v in enumerate(model.c) if v != 0]) \
        if np.any(model.c) else pulp.lpSum([])
    A = model.A
    for r in range(A.shape[0]):
        s, e = A.indptr[r], A.indptr[r + 1]
        expr = pulp.LpAffineExpression([(xs[j], float(v)) for j, v in zip(A.indices[s:e], A.data[s:e])])
        lo, hi = model.row_lo[r], model.row_hi[r]
        if lo == hi:
            prob += expr == float(lo)
            continue
        if np.isfinite(hi):
            prob += expr <= float(hi)
        if np.isfinite(lo):
            prob += expr >= float(lo)
    with warnings.catch_warnings():  # pulp 3.3 deprecates the bundled CBC; it is still the one that ships
        warnings.simplefilter("ignore", DeprecationWarning)
        cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=float(mip_gap))
    try:
        prob.solve(cmd)
    except Exception as e:
        return Solution("failed", "cbc", 0.0, message=f"CBC error: {e}")
    # sol_status: 1 optimal, 2 feasible (stopped early), 0 none found, -1 infeasible, -2 unbounded
    msg = f"CBC: {pulp.LpStatus.get(prob.status, prob.status)} / {pulp.LpSolution.get(prob.sol_status, prob.sol_status)}"
    if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
        return Solution("infeasible", "cbc", 0.0, message=msg)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return Solution("failed", "cbc", 0.0, message=msg)
    x = np.array([v.value() or 0.0 for v in xs[:model.n_x]])
    status = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time_limit"
    return Solution(status, "cbc", 0.0, choice=_decode(x, model, _rules_of(model)), message=msg)


# ----------------------------------------------------------------------------- feasibility


def least_density(problem: Problem) -> tuple[np.ndarray, float, int]:
    """(per_length [n], joint, binding): the least average cost any plan reaches at each budget
    length alone, the least budget that some single plan meets at every length at once, and
    the index of the length that binds at that joint optimum.

    Rule costs do not depend on the head, so giving every member of a GQA group the same rule
    is optimal here and only the count of groups per (layer, rule) matters: a small integer
    program in counts n[layer, r] (plus used[layer, r] with a per-layer rule limit).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    d = problem.density
    per_length = d.min(-1)
    nlen, R = d.shape
    groups = problem.units // problem.group
    K = problem.max_rules_per_layer
    use_u = K is not None and K < min(R, groups // problem.layers)
    # without a per-layer rule limit the layers are interchangeable: count over all groups at once
    Lyr = problem.layers if use_u else 1
    per_layer = groups // Lyr
    G = per_layer * Lyr
    n_n, n_u = Lyr * R, (Lyr * R if use_u else 0)
    nv = n_n + n_u + 1                      # counts, used flags, t
    c = np.zeros(nv)
    c[-1] = 1.0
    rows = []
    lo, hi = [], []
    for layer in range(Lyr):                # each layer's groups all get a rule
        row = np.zeros(nv)
        row[layer * R:(layer + 1) * R] = 1
        rows.append(row), lo.append(per_layer), hi.append(per_layer)
    for li in range(nlen):                  # mean cost at length li <= t
        row = np.zeros(nv)
        row[:n_n] = np.tile(d[li], Lyr) / G
        row[-1] = -1
        rows.append(row), lo.append(-np.inf), hi.append(0)
    if use_u:
        for k in range(n_n):                # n <= per_layer * used
            row = np.zeros(nv)
            row[k], row[n_n + k] = 1, -per_layer
            rows.append(row), lo.append(-np.inf), hi.append(0)
        for layer in range(Lyr):
            row = np.zeros(nv)
            row[n_n + layer * R:n_n + (layer + 1) * R] = 1
            rows.append(row), lo.append(-np.inf), hi.append(K)
    integ = np.ones(nv)
    integ[-1] = 0
    ub = np.concatenate([np.full(n_n, per_layer), np.ones(n_u), [np.inf]])
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integ,
               bounds=Bounds(np.zeros(nv), ub), options={"mip_rel_gap": 1e-9, "disp": False, "time_limit": 60.0})
    if res.x is None:
        raise SearchError(f"could not compute the least feasible density ({res.message})")
    counts = np.round(res.x[:n_n]).reshape(Lyr, R).sum(0)
    dens = d @ counts / G
    return per_length, float(dens.max()), int(dens.argmax())


def check_budget(problem: Problem) -> None:
    """Raise SearchError naming the length whose budget cannot be met and the least feasible budget."""
    tol = 1e-12
    if np.any(np.all(problem.density <= problem.budget + tol, axis=0)):
        return  # one rule meets the budget at every length: every head may take it
    per_length, joint, binding = least_density(problem)
    if joint <= problem.budget + tol:
        return
    kind = f"{problem.kind} density"
    least = _round_up(joint)
    bad = [i for i in range(len(per_length)) if per_length[i] > problem.budget + tol]
    if bad:
        parts = [f"length {problem.budget_lengths[i]} (the least average {kind} any plan reaches there is "
                 f"{per_length[i]:.4f})" for i in bad]
        head = f"budget {problem.budget:g} ({kind}) cannot be met at " + "; ".join(parts)
    else:
        head = (f"budget {problem.budget:g} ({kind}) cannot be met at every length at once: no single plan "
                f"fits it at length {problem.budget_lengths[binding]} while fitting it at the others "
                f"({', '.join(map(str, problem.budget_lengths))})")
    raise SearchError(f"{head}. The smallest feasible budget (all lengths {problem.budget_lengths} together"
                      f"{', at most %d rules per layer' % problem.max_rules_per_layer if problem.max_rules_per_layer else ''}"
                      f") is {least:.4f}; add rules with smaller spans (a denser candidate grid, smaller sink) "
                      f"or raise the budget.")


def _round_up(x: float, digits: int = 4) -> float:
    """x rounded up at `digits` decimals, so the printed least budget is itself feasible."""
    q = 10 ** digits
    return float(np.ceil(x * q - 1e-9) / q)
