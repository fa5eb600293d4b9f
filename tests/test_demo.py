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
    assert "\t" not in printed
    # every stage left its output in the one folder
    assert (out / "calibration" / "meta.json").exists()
    assert sorted(p.name for p in (out / "profiles").glob("influence_*.safetensors")) == [
        "influence_192.safetensors", "influence_288.safetensors", "influence_384.safetensors"]
    plan = load_plan(out / "search" / "plan.json")
    assert plan.profiled_lengths == [192, 288, 384]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    cells = {(r["config"], r["length"]): r for r in summary["results"]}
    configs = {c for c, _ in cells}
    assert len(configs) == 3 and "dense" in configs and "uniform@0.5" in configs
    for (c, n), r in cells.items():
        assert n in (192, 288, 384, 768)
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["ppl"])
        if c == "dense":
            assert r["kv_density"] == 1.0
        else:  # both sparse configs at the 0.5 budget, also at 2x the longest profiled length
            assert r["kv_density"] <= 0.5 + 1e-9
    md = (out / "summary.md").read_text()
    assert ("| config | 192 (3 items) | 288 (3 items) | 384 (3 items) | 768 (3 items) |" in md
            and "| MoA (searched plan) |" in md)
    # 3 items per cell: the summary says the differences are noise, on screen and in the file
    assert "only 3 item(s) per length" in md and "only 3 item(s) per length" in " ".join(printed.split())
    for png in ("accuracy_vs_length.png", "depth_heatmaps.png"):
        assert (out / "eval" / png).stat().st_size > 0
