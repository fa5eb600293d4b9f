"""moa search: loss tables against token masks, the 0/1 program against brute force, both
solvers, budgets at every length, the group-max model, infeasibility messages, resume, CLI."""
import csv
import itertools

import numpy as np
import pytest
import torch

from moa_search import milp
from moa_search import rules as R
from moa_search import search as S
from moa_search.milp import Problem, SearchError
from moa_search.plan import ModelShape, load_plan
from moa_search.profiler.io import Profile, profile_path, save_profile


# ----------------------------------------------------------------------------- tables


def brute_block_fraction(n, bs, sink, span):
    keep = R.kept_matrix(n, sink, span).numpy()
    causal = np.tril(np.ones((n, n), dtype=bool))
    dropped = causal & ~keep
    nb = R.block_count(n, bs)
    pad = nb * bs - n

    def blocks(m):
        m = np.pad(m.astype(np.int64), ((0, pad), (0, pad)))
        return m.reshape(nb, bs, nb, bs).sum((1, 3))

    c, d = blocks(causal), blocks(dropped)
    return np.divide(d, c, out=np.zeros(c.shape), where=c > 0)


@pytest.mark.parametrize("n,bs", [(37, 8), (64, 16), (50, 7), (5, 8)])
@pytest.mark.parametrize("sink", [0, 3, 12])
def test_block_drop_fraction_matches_token_mask(n, bs, sink):
    spans = sorted({1, 2, 4, 9, 17, n // 2 or 1, n - 1 or 1, n})
    got = R.block_drop_fraction(n, bs, sink, spans)
    for k, s in enumerate(spans):
        np.testing.assert_allclose(got[k], brute_block_fraction(n, bs, sink, s), rtol=0, atol=1e-12)


def test_loss_table_equals_token_level_dropped_influence():
    """With influence spread evenly over each block's causal entries, the table is exact."""
    rng = np.random.default_rng(0)
    n, bs, sink, L, H = 45, 8, 5, 2, 3
    nb = R.block_count(n, bs)
    causal = np.tril(np.ones((n, n)))
    blk = rng.random((L, H, nb, nb))
    idx = np.arange(n) // bs
    counts = np.zeros((nb, nb))
    np.add.at(counts, (idx[:, None], idx[None, :]), causal)
    E = blk[:, :, idx[:, None], idx[None, :]] / np.maximum(counts, 1)[idx[:, None], idx[None, :]] * causal
    influence = np.zeros((L, H, nb, nb))
    for li in range(L):
        for h in range(H):
            np.add.at(influence[li, h], (idx[:, None], idx[None, :]), E[li, h])
    rules = [R.Rule(3, 0), R.Rule(0, 0.5), R.Rule(-4, 0.75), R.Rule(10, 0.25), R.Rule(0, 1)]
    got = S.loss_table(torch.from_numpy(influence), n, bs, sink, rules)
    for k, rule in enumerate(rules):
        drop = causal * ~R.kept_matrix(n, sink, rule.span(n)).numpy()
        np.testing.assert_allclose(got[..., k], (E * drop).sum((-1, -2)), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- brute force


def brute_force(p: Problem, weights, eps=None):
    """Best objective over every choice of one rule per unit (None if nothing is feasible)."""
    U, Rn = p.units, p.rules
    ch = np.array(list(itertools.product(range(Rn), repeat=U)))
    losses = p.loss[:, np.arange(U)[None, :], ch].sum(-1).T                    # [C, m]
    d = p.density[:, ch]                                                        # [n, C, U]
    cost = d.reshape(d.shape[0], len(ch), -1, p.group).max(-1).mean(-1).T       # [C, n] group max
    ok = np.all(cost <= p.budget + 1e-12, axis=1)
    if p.lower is not None:  # on the mean per-unit density (documented in milp)
        ok &= np.all(d.mean(-1).T >= p.lower - 1e-12, axis=1)
    if p.max_rules_per_layer is not None:
        per = ch.reshape(len(ch), p.layers, -1)
        distinct = np.array([[len(set(r)) for r in c] for c in per.tolist()])
        ok &= distinct.max(1) <= p.max_rules_per_layer
    if eps is not None:
        for li, e in enumerate(eps):
            if e is not None and np.isfinite(e):
                ok &= losses[:, li] <= e + 1e-12
    if not ok.any():
        return None
    obj = losses @ np.asarray(weights)
    return float(obj[ok].min())


def random_problem(seed, units, rules, layers, group, lengths=(64, 128), extend=(512,), **kw):
    rng = np.random.default_rng(seed)
    rule_list = [R.Rule(float(a), float(b)) for a, b in
                 zip(rng.integers(1, 40, rules), rng.choice([0, 0.125, 0.25, 0.5, 0.75], rules))]
    blens = sorted(set(lengths) | set(extend))
    dens = S.density_table(rule_list, blens, sink=4)
    loss = rng.random((len(lengths), units, rules)) * rng.random((1, units, 1))
    budget = kw.pop("budget", None)
    if budget is None:  # somewhere between the sparsest and the densest plan: the budget binds
        budget = float(np.quantile(dens.max(0), 0.45))
    return Problem(loss=loss, density=dens, budget=budget, budget_lengths=blens, loss_lengths=list(lengths),
                   layers=layers, group=group, **kw)


CASES = [
    # (units, rules, layers, group, extra)
    (4, 4, 2, 1, {}),
    (6, 3, 2, 1, {"max_rules_per_layer": 1}),
    (4, 4, 1, 1, {"lower": 0.05}),
    (8, 3, 2, 2, {}),                            # query_head: 2 layers x 2 groups of 2 query heads
    (8, 3, 2, 2, {"max_rules_per_layer": 2}),
    (6, 3, 1, 3, {}),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("seed", [0, 1])
def test_milp_optimum_equals_brute_force(case, seed):
    units, rules, layers, group, extra = CASES[case]
    p = random_problem(seed * 10 + case, units, rules, layers, group, **extra)
    for weights, eps in [([0.0, 1.0], None), ([1.0, 0.3], None)]:
        best = brute_force(p, weights, eps)
        sol = milp.solve(p, weights, eps, mip_gap=0.0)
        if best is None:
            assert sol.status == "infeasible"
            continue
        assert sol.status == "optimal"
        assert sol.objective == pytest.approx(best, rel=1e-7, abs=1e-9)
        assert np.all(p.densities(sol.choice) <= p.budget + 1e-9)
    # epsilon constraint: bound the other length's loss halfway between its extremes
    lo = milp.solve(p, [1.0, 0.0], mip_gap=0.0)
    hi = milp.solve(p, [0.0, 1.0], mip_gap=0.0)
    if lo.feasible:
        eps = [(lo.losses[0] + hi.losses[0]) / 2, None]
        sol = milp.solve(p, [0.0, 1.0], eps, mip_gap=0.0)
        assert sol.objective == pytest.approx(brute_force(p, [0.0, 1.0], eps), rel=1e-7, abs=1e-9)
        assert sol.losses[0] <= eps[0] + 1e-9


def test_granularities_on_a_real_table_equal_brute_force():
    """make_problem's kv_head (influence summed per group) and query_head (group max) against
    brute force over query-head assignments of the same tables."""
    rng = np.random.default_rng(3)
    shape = ModelShape("LlamaForCausalLM", "llama", 1, 4, 2, 8)
    rules = [R.Rule(8, 0), R.Rule(0, 0.5), R.Rule(16, 0.25)]
    loss = rng.random((2, 1, 4, 3))
    tables = S.Tables([64, 128], loss, rules, shape, block_size=16, sink=4)
    p_q = S.make_problem(tables, 0.5, "kv", "query_head", extend_lengths=[256])
    p_k = S.make_problem(tables, 0.5, "kv", "kv_head", extend_lengths=[256])
    assert p_q.group == 2 and p_k.group == 1 and p_k.units == 2
    ch = np.array(list(itertools.product(range(3), repeat=4)))
    q_loss = loss[1, 0][np.arange(4), ch].sum(1)
    spans = np.array([[r.span(n) for r in rules] for n in p_q.budget_lengths])       # [n, R]
    cache = R.kv_density(4, spans[:, ch].reshape(len(spans), len(ch), 2, 2).max(-1), np.array(p_q.budget_lengths)[:, None, None]).mean(-1)
    ok = np.all(cache <= 0.5 + 1e-12, axis=0)
    tied = (ch[:, 0] == ch[:, 1]) & (ch[:, 2] == ch[:, 3])
    for p, mask in ((p_q, ok), (p_k, ok & tied)):
        sol = milp.solve(p, [0.0, 1.0], mip_gap=0.0)
        assert sol.objective == pytest.approx(q_loss[mask].min(), rel=1e-9)


@pytest.mark.parametrize("group", [1, 2])
def test_highs_and_cbc_agree(group):
    p = random_problem(7, 24, 6, 3, group, lengths=(64, 128, 256), extend=(1024,), max_rules_per_layer=3)
    for weights in ([0.0, 0.0, 1.0], [0.5, 0.2, 1.0]):
        a = milp.solve(p, weights, solver="highs", mip_gap=0.0)
        b = milp.solve(p, weights, solver="cbc", mip_gap=0.0)
        assert a.status == b.status == "optimal"
        assert a.objective == pytest.approx(b.objective, rel=1e-7)
        assert np.all(p.densities(b.choice) <= p.budget + 1e-9)


def test_group_max_model():
    """Two query heads share a KV head. Head 0 wants the full window, head 1 the short one;
    their mean span fits the budget but the cache (the group's max) does not."""
    dens = np.array([[0.1, 1.0]])                # rule 0 short, rule 1 full
    loss = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # heads 0,1 gain from full; group 2 does not care
    p = Problem(loss=loss, density=dens, budget=0.6, budget_lengths=[100], loss_lengths=[100], layers=1, group=2)
    sol = milp.solve(p, [1.0], mip_gap=0.0)
    # cache: group A full (1.0) + group B short (0.1) -> 0.55 <= 0.6 with loss 0: both heads of A full
    assert sol.status == "optimal" and sol.objective == pytest.approx(0.0)
    assert list(sol.choice[:2]) == [1, 1] and sol.densities[0] == pytest.approx(0.55)
    p.budget = 0.5   # now group A cannot hold the full window at all: per-head mean (0.55 -> 0.325) would allow one
    sol = milp.solve(p, [1.0], mip_gap=0.0)
    assert list(sol.choice[:2]) == [0, 0] and sol.objective == pytest.approx(2.0)
    assert sol.densities[0] == pytest.approx(0.1)
    assert brute_force(p, [1.0]) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- budgets and messages


def test_budget_holds_at_extend_lengths():
    """Rule A (alpha<0) is cheap at the profiled lengths and grows with N; without the extend
    length the optimum uses it everywhere and breaks the budget at 4096."""
    rules = [R.Rule(-64, 0.5), R.Rule(128, 0), R.Rule(0, 1)]
    shape = ModelShape("LlamaForCausalLM", "llama", 2, 2, 2, 8)
    loss = np.zeros((2, 2, 2, 3))
    loss[..., 1] = 1.0                            # the fixed window loses, A and full are free
    loss[..., 2] = 0.0
    tables = S.Tables([256, 512], loss, rules, shape, block_size=16, sink=0)
    free = S.make_problem(tables, 0.4, "kv", "kv_head")
    sol = milp.solve(free, [0.0, 1.0], mip_gap=0.0)
    n4k = S.density_table(rules, [4096], 0)[0]
    assert n4k[sol.choice].mean() > 0.4           # the trap is real
    ext = S.make_problem(tables, 0.4, "kv", "kv_head", extend_lengths=[4096])
    sol = milp.solve(ext, [0.0, 1.0], mip_gap=0.0)
    assert sol.feasible
    plan = S.plan_from_choice(tables, sol.choice, "kv_head")
    for n in (256, 512, 4096):
        assert plan.densities(n)["kv_cache_density"] <= 0.4 + 1e-12


def test_infeasible_budget_names_length_and_least_budget():
    rules = [R.Rule(64, 0), R.Rule(0, 0.5)]
    shape = ModelShape("LlamaForCausalLM", "llama", 2, 4, 2, 8)
    tables = S.Tables([256, 512], np.random.default_rng(0).random((2, 2, 4, 2)), rules, shape, 16, sink=16)
    # least KV density: 256 -> (16 + 64) / 256 = 0.3125, 512 -> 80 / 512 = 0.156
    least = max(min(R.kv_density(16, r.span(n), n) for r in rules) for n in (256, 512))
    assert least == pytest.approx(0.3125)
    p = S.make_problem(tables, 0.2, "kv", "query_head")
    with pytest.raises(SearchError, match=r"cannot be met at length 256") as e:
        milp.check_budget(p)
    msg = str(e.value)
    assert "length 512 (" not in msg and "smallest feasible budget" in msg and "0.3125" in msg
    milp.check_budget(S.make_problem(tables, 0.3125, "kv", "query_head"))   # the promise holds
    with pytest.raises(SearchError, match=r"0\.3125"):
        milp.check_budget(S.make_problem(tables, 0.3124, "kv", "query_head"))


def test_jointly_infeasible_budget_gives_least_joint_budget():
    """Each length alone can meet 0.3, no single plan meets both; the least joint budget is 0.4."""
    dens = np.array([[0.2, 0.6], [0.6, 0.2]])
    p = Problem(loss=np.zeros((1, 4, 2)), density=dens, budget=0.3, budget_lengths=[1000, 2000],
                loss_lengths=[1000], layers=2)
    with pytest.raises(SearchError, match=r"at every length at once.*length (1000|2000).*0\.4000"):
        milp.check_budget(p)
    p.budget = 0.4
    milp.check_budget(p)
    assert milp.solve(p, [1.0]).feasible
    p.budget, p.max_rules_per_layer = 0.3, 1     # one rule per layer: layers split 1 and 1 -> still 0.4
    assert milp.least_density(p)[1] == pytest.approx(0.4)


# ----------------------------------------------------------------------------- end to end


def write_profiles(folder, lengths=(128, 256), bs=16, layers=2, heads=4, kv_heads=2, seed=0):
    """Synthetic influence: local heads (mass near the diagonal) and retrieval heads (mass far away)."""
    shape = ModelShape("LlamaForCausalLM", "llama", layers, heads, kv_heads, 8, fingerprint="synthetic")
    rng = np.random.default_rng(seed)
    reach0 = rng.random((layers, heads))
    for n in lengths:
        # heads change their reach with the length a little: the per-length losses then conflict
        reach = reach0 * np.exp(rng.normal(0, 0.7, (layers, heads)))
        nb = R.block_count(n, bs)
        q, k = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
        dist = (q - k) / nb
        base = np.where(k <= q, 1.0, 0.0)
        infl = base * (np.exp(-dist[None, None] / (0.02 + reach[..., None, None])) + 0.05 * rng.random((layers, heads, nb, nb)))
        save_profile(Profile(torch.from_numpy(infl), n, bs, 4, shape, calibration_hash="synthetic"), profile_path(folder, n))
    return shape


def test_search_writes_plans_within_budget(tmp_path):
    write_profiles(tmp_path / "prof")
    tables = S.load_tables(tmp_path / "prof", sink=4, alpha_steps=4, progress=False)
    res = S.search(tables, 0.4, tmp_path / "out", granularity="query_head", extend_lengths=[2048],
                   pareto_points=6, progress=False)
    assert (tmp_path / "out" / "plan.json").exists() and (tmp_path / "out" / "pareto_front.png").exists()
    assert (tmp_path / "out" / "chosen_spans.png").exists()
    files = sorted((tmp_path / "out" / "pareto").glob("plan_*.json"))
    assert len(files) == len(res.pareto) >= 1
    for f in files:
        plan = load_plan(f)
        for n in (128, 256, 2048):
            assert plan.densities(n)["kv_cache_density"] <= 0.4 + 1e-9
        assert set(plan.predicted_loss) == {"128", "256"} and plan.budget["lengths"] == [128, 256, 2048]
    chosen = load_plan(tmp_path / "out" / "plan.json")
    assert chosen.predicted_loss["256"] == min(p.losses[-1] for _, p, _ in res.pareto)
    assert "no validation set" in res.selection
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert len(rows) == len(res.points) and sum(r["chosen"] == "True" for r in rows) == 1
    # no plan on the front is beaten at both lengths by any solved point
    for _, p, _ in res.pareto:
        for q in res.points:
            if q.feasible:
                assert not (all(a <= b for a, b in zip(q.losses, p.losses)) and q.losses != p.losses)


def test_resume_does_not_redo_finished_points(tmp_path, monkeypatch):
    write_profiles(tmp_path / "prof")
    tables = S.load_tables(tmp_path / "prof", sink=4, alpha_steps=4, progress=False)
    calls = []
    real = milp.solve

    def counting(*a, **k):
        calls.append(k.get("eps") if "eps" in k else a[2])
        if len(calls) == 4 and interrupt:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(milp, "solve", counting)
    kw = dict(granularity="kv_head", pareto_points=7, progress=False)   # 2 anchors + 5 grid points
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        S.search(tables, 0.5, tmp_path / "out", **kw)
    assert len(calls) == 4                       # 3 finished, the 4th interrupted
    calls.clear()
    interrupt = False
    res = S.search(tables, 0.5, tmp_path / "out", **kw)
    assert len(calls) == 7 - 3                   # the interrupted point and the 3 never started
    assert sum(p.resumed for p in res.points) == 3
    assert sorted(p.point for p in res.points) == list(range(7))
    calls.clear()
    again = S.search(tables, 0.5, tmp_path / "out", **kw)
    assert calls == [] and all(p.resumed for p in again.points)
    monkeypatch.setattr(milp, "solve", real)
    fresh = S.search(tables, 0.5, tmp_path / "fresh", **kw, jobs=2)        # worker processes: same points
    np.testing.assert_allclose([p.losses for p in fresh.points], [p.losses for p in res.points], rtol=1e-9)
    assert [p.status for p in fresh.points] == [p.status for p in res.points]


def test_cli_search(tmp_path, capsys):
    from moa_search.cli import main

    write_profiles(tmp_path / "prof", lengths=(128, 256, 512))
    rc = main(["search", "--profiles", str(tmp_path / "prof"), "--budget", "0.45", "--sink", "8",
               "--alpha-steps", "4", "--extend-lengths", "1k", "--pareto-points", "7", "--solver", "cbc",
               "--max-rules-per-layer", "2", "--quiet", "-o", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "no validation set" in out
    plan = load_plan(tmp_path / "out" / "plan.json")
    assert plan.granularity == "kv_head" and plan.sink == 8 and plan.budget["density"] == 0.45
    a, b = plan.query_rules()
    assert max(len(set(zip(a[l], b[l]))) for l in range(2)) <= 2
    rc = main(["search", "--profiles", str(tmp_path / "prof"), "--budget", "0.001", "--quiet",
               "-o", str(tmp_path / "bad")])
    assert rc == 2 and "smallest feasible budget" in capsys.readouterr().err


def test_validation_scorer_full_plan_equals_dense_masked_loss():
    import datasets

    from helpers import tiny_model
    from moa_search.plan import uniform_plan

    model = tiny_model("llama", attn="sdpa")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 97, (n,), generator=g).tolist(), "response_start": rs, "response_end": re}
            for n, rs, re in ((40, 30, 38), (33, 5, 33))]
    data = datasets.Dataset.from_list(rows)
    score = S.validation_scorer(model, data, backend="reference")
    shape = ModelShape.from_config(model.config)
    got_full = score(uniform_plan(shape, sink=2, span_fraction=1.0))
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logits = model(input_ids=ids).logits[0]
            rs, re = r["response_start"], r["response_end"]
            total += float(torch.nn.functional.cross_entropy(logits[rs - 1:re - 1], ids[0, rs:re], reduction="sum"))
            count += re - rs
    assert got_full == pytest.approx(total / count, rel=1e-4)
    assert score(uniform_plan(shape, sink=1, span_tokens=2)) != pytest.approx(got_full, rel=1e-4)
    assert model.config._attn_implementation != "moa"       # the scorer leaves the model as it found it


def test_search_warns_when_the_sink_takes_much_of_the_budget(tmp_path, capsys):
    """At the shortest profiled length (256) a 0.4 budget is 102 tokens; a 32-token sink is 31% of
    it, so the heads differ only in the other 70 tokens: `moa search` says so. A 4-token sink is 4%."""
    from pathlib import Path

    from moa_search.cli import main

    profiles = Path(__file__).parent / "data" / "demo_quick"
    common = ["search", "--profiles", str(profiles), "--budget", "0.4", "--pareto-points", "2", "--quiet"]
    assert main(common + ["--sink", "32", "-o", str(tmp_path / "wide")]) == 0
    err = capsys.readouterr().err
    assert "moa search: warning:" in err and "32-token sink takes 31% of the KV budget" in err
    assert main(common + ["--sink", "4", "-o", str(tmp_path / "narrow")]) == 0
    assert "sink takes" not in capsys.readouterr().err
