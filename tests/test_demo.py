"""`moa demo --quick` end to end on the CPU: calibrate, profile, search, eval on the embedded model."""
import json
import math


from moa_search import demo


def test_embedded_model_loads_and_has_the_promised_shape():
    from transformers import AutoConfig, AutoTokenizer

    path = demo.embedded_model_dir()
    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert cfg.model_type == "llama"
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 2)
    assert cfg.max_position_embeddings >= 16384
    assert len(tok) == cfg.vocab_size
    assert (path / "model.safetensors").stat().st_size < 16 * 2**20


def test_demo_quick_end_to_end(tmp_path, capsys):
    from moa_search.cli import main
    from moa_search.plan import load_plan

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--device", "cpu", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MoA (searched" in printed and "uniform@0.5" in printed and "summary" in printed
    # every stage left its output in the one folder
    assert (out / "calibration" / "meta.json").exists()
    assert sorted(p.name for p in (out / "profiles").glob("influence_*.safetensors")) == [
        "influence_256.safetensors", "influence_512.safetensors", "influence_768.safetensors"]
    plan = load_plan(out / "search" / "plan.json")
    assert plan.profiled_lengths == [256, 512, 768]
    # the same seed gives the plan the code before the issue-17 refactor gave (tests/data/demo_quick)
    from test_golden import DATA, assert_same_plan

    assert_same_plan(out / "search" / "plan.json", DATA / "plan.json")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    cells = {(r["config"], r["length"]): r for r in summary["results"]}
    configs = {c for c, _ in cells}
    assert len(configs) == 3 and "dense" in configs and "uniform@0.5" in configs
    for (c, n), r in cells.items():
        assert n in (256, 512, 768, 1536)
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["ppl"])
        if c == "dense":
            assert r["kv_density"] == 1.0
        else:  # both sparse configs at the 0.5 budget, also at 2x the longest profiled length
            assert r["kv_density"] <= 0.5 + 1e-9
    md = (out / "summary.md").read_text()
    assert "| config | 256 | 512 | 768 | 1536 |" in md and "| MoA (searched plan) |" in md
    for png in ("accuracy_vs_length.png", "depth_heatmaps.png"):
        assert (out / "eval" / png).stat().st_size > 0
