"""Refactors keep the answers: `moa demo --quick`'s search, replayed on the profiles it wrote.

tests/data/demo_quick/ holds what `moa demo --quick --device cpu` wrote with the code before
the layering refactor (issue 17): the three influence profiles (256/512/768 tokens), the
chosen plan and the Pareto plans. The search below is the demo's own command line; the same
profiles must give the same plans, rule for rule, and the same predicted losses.
test_demo.py checks the whole pipeline (calibrate + profile + search) against the same plan.
"""
import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data" / "demo_quick"


def _rules(path):
    d = json.loads(Path(path).read_text())
    return d["rules"], d["predicted_loss"], d["budget"]["achieved"], d["sink"], d["granularity"]


def assert_same_plan(got_path, want_path):
    got, want = _rules(got_path), _rules(want_path)
    assert got[0] == want[0]                     # alpha and beta of every layer and head
    assert got[3:] == want[3:]                   # sink, granularity
    for table in (1, 2):                         # predicted losses, achieved densities
        assert got[table].keys() == want[table].keys()
        np.testing.assert_allclose([got[table][k] for k in sorted(got[table])],
                                   [want[table][k] for k in sorted(want[table])], rtol=1e-9, atol=1e-15)


def test_demo_quick_search_gives_the_recorded_plans(tmp_path):
    from moa_search.cli import main

    out = tmp_path / "search"
    # the arguments `moa demo --quick` passes to `moa search`
    assert main(["search", "--profiles", str(DATA), "--budget", "0.5", "-o", str(out), "--extend-lengths", "1536",
                 "--pareto-points", "4", "--sink", "16", "--quiet"]) == 0
    assert_same_plan(out / "plan.json", DATA / "plan.json")
    want = sorted((DATA / "pareto").glob("plan_*.json"))
    got = sorted((out / "pareto").glob("plan_*.json"))
    assert [p.name for p in got] == [p.name for p in want]
    for g, w in zip(got, want):
        assert_same_plan(g, w)


def test_search_plans_from_python_gives_the_same_plan(tmp_path):
    import moa_search

    res = moa_search.search_plans(DATA, 0.5, tmp_path / "s", sink=16, extend_lengths=[1536], pareto_points=4,
                                  progress=False, jobs=1)
    assert_same_plan(tmp_path / "s" / "plan.json", DATA / "plan.json")
    assert res.plan.to_dict()["rules"] == json.loads((DATA / "plan.json").read_text())["rules"]
