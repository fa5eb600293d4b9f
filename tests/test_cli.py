"""The `moa` command line, run as a user would (in-process through cli.main, and once as a subprocess)."""
import importlib.util
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from moa_search import rules as R
from moa_search.cli import main
from moa_search.plan import load_plan

from helpers import random_plan, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama checkpoint with a trained BPE tokenizer, as from_pretrained expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["the pass key is 12345. remember it. the grass is green and the sky is blue."] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=97, special_tokens=["<unk>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(d)
    model = tiny_model("llama", vocab=len(fast))
    model.save_pretrained(d)
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_uniform_then_inspect_json(capsys, model_dir, tmp_path):
    out = tmp_path / "u.json"
    code, stdout, _ = run(capsys, "plan", "uniform", "--model", model_dir, "--sink", 64, "--span-fraction", 0.5, "-o", out)
    assert code == 0 and out.exists()
    code, stdout, _ = run(capsys, "plan", "inspect", out, "--lengths", "4096,8192,16384", "--json")
    assert code == 0
    info = json.loads(stdout)
    for n in (4096, 8192, 16384):
        d = info["lengths"][str(n)]
        assert d["kv_density"] == pytest.approx((64 + n // 2) / n)
        assert d["compute_density"] == pytest.approx(R.compute_density(64, n // 2, n))
    assert info["distinct_rules"] == 1


def test_plan_inspect_table_and_per_layer(capsys, tmp_path):
    from moa_search.plan import save_plan

    plan = random_plan(tiny_model("llama"), seed=2)
    p = save_plan(plan, tmp_path / "p.json")
    code, stdout, _ = run(capsys, "plan", "inspect", p, "--lengths", "100,200")
    assert code == 0 and "compute density" in stdout and "per layer at N=200" in stdout
    code, stdout, _ = run(capsys, "plan", "inspect", p, "--lengths", "200", "--json")
    info = json.loads(stdout)
    spans = plan.spans(200)
    assert info["layers"][1]["mean_span_fraction"] == pytest.approx(spans[1].mean() / 200)
    assert info["lengths"]["200"]["kv_density"] == pytest.approx(np.mean(R.kv_density(plan.sink, spans, 200)))


def test_plan_convert_from_moa(capsys, model_dir, tmp_path):
    moa = {"alphas": [[1024.0] * 4, [2048.0] * 4], "betas": [[0.0] * 4, [0.5] * 4]}
    src = tmp_path / "moa.json"
    src.write_text(json.dumps(moa))
    out = tmp_path / "conv.json"
    code, stdout, _ = run(capsys, "plan", "convert", "--from-moa", src, "--model", model_dir, "-o", out)
    assert code == 0
    plan = load_plan(out)
    assert plan.sink == 64 and plan.alpha[0] == [960.0] * 4 and plan.beta[1] == [0.5] * 4


def test_cli_errors_are_clear(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    code, _, err = run(capsys, "plan", "inspect", bad)
    assert code == 2 and "bad.json: not valid JSON" in err
    moa = tmp_path / "moa.json"
    moa.write_text(json.dumps({"alphas": [[1.0] * 4], "betas": [[0.0] * 4]}))
    code, _, err = run(capsys, "plan", "convert", "--from-moa", moa, "--model", model_dir, "-o", tmp_path / "x.json")
    assert code == 2 and "one row per layer (2), got 1" in err
    code, _, err = run(capsys, "generate", "--model", model_dir, "--prompt", "hi")
    assert code == 2 and "--plan" in err


def test_generate_with_plan(capsys, model_dir, tmp_path):
    plan = tmp_path / "u.json"
    run(capsys, "plan", "uniform", "--model", model_dir, "--sink", 2, "--span-tokens", 4, "-o", plan)
    code, stdout, _ = run(capsys, "generate", "--model", model_dir, "--plan", plan, "--prompt",
                          "the pass key is 12345. remember it.", "--max-new-tokens", 5, "--device", "cpu")
    assert code == 0 and stdout.strip() != ""
    if importlib.util.find_spec("accelerate") is not None:  # the same text with the model loaded by accelerate
        code, mapped, _ = run(capsys, "generate", "--model", model_dir, "--plan", plan, "--prompt",
                              "the pass key is 12345. remember it.", "--max-new-tokens", 5, "--device-map", "auto")
        assert code == 0 and mapped == stdout


def test_every_subcommand_has_help():
    from moa_search.cli import COMMANDS

    helps = {}
    for name in [None, *COMMANDS, "bench decode"]:
        argv = ([] if name is None else name.split()) + ["--help"]
        r = subprocess.run([sys.executable, "-m", "moa_search.cli", *argv], capture_output=True, text=True,
                           env=dict(os.environ, COLUMNS="80"))
        assert r.returncode == 0, (name, r.stderr)
        assert "usage: moa " + (name or "") in r.stdout
        helps[name] = r.stdout
    # the help teaches: examples, no internals, nothing that is not in the repository
    assert "moa calibrate --model" in helps[None] and "add_arguments" not in helps[None]
    assert "examples:" in helps["bench"] and "add_arguments" not in helps["bench"]
    assert "DESIGN.md" not in "".join(helps.values())
    assert "|dS_ij| / max(1 - A_ij, 1e-4)" in helps["profile"] and "ceil(N/B)" in helps["profile"]
    search = " ".join(helps["search"].split())
    assert "0 < span <= N at every profiled length" in search and "floor(-STEPS/4)" in search
    assert "plus 1e-4 x the losses at the other lengths" in search
    assert all(len(line) <= 80 for line in helps[None].splitlines())


def test_outputs_follow_the_umask(tmp_path, model_dir, capsys):
    """Plans, profiles and calibration folders get the modes a plain open()/mkdir() would give."""
    import datasets
    import torch

    from moa_search.calibrate import save_calibration
    from moa_search.plan import ModelShape
    from moa_search.profiler.io import Profile, save_profile

    old = os.umask(0o022)
    try:
        code, _, _ = run(capsys, "plan", "uniform", "--model", model_dir, "--span-tokens", 8, "-o", tmp_path / "u.json")
        assert code == 0 and stat.S_IMODE((tmp_path / "u.json").stat().st_mode) == 0o644
        shape = ModelShape.from_pretrained(model_dir)
        prof = save_profile(Profile(torch.zeros(2, 4, 1, 1, dtype=torch.float64), 16, 16, 1, shape), tmp_path / "p.safetensors")
        assert stat.S_IMODE(prof.stat().st_mode) == 0o644
        cal = save_calibration(datasets.Dataset.from_list([{"x": 1}]), tmp_path / "cal", {"k": 1})
        assert stat.S_IMODE(cal.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in cal.iterdir()} == {0o644}
        os.umask(0o077)
        code, _, _ = run(capsys, "plan", "uniform", "--model", model_dir, "--span-tokens", 8, "-o", tmp_path / "v.json")
        assert stat.S_IMODE((tmp_path / "v.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_ctrl_c_says_what_was_kept_and_how_to_resume(capsys, model_dir, tmp_path, monkeypatch):
    import moa_search.calibrate as C
    from moa_search import milp

    from helpers import interrupt_on_call
    from test_search import write_profiles

    write_profiles(tmp_path / "prof")
    search = ["search", "--profiles", tmp_path / "prof", "--budget", 0.45, "--sink", 4, "--alpha-steps", 4,
              "--pareto-points", 4, "--jobs", 1, "--quiet", "-o", tmp_path / "s"]
    interrupt_on_call(monkeypatch, milp, "solve", 2)
    code, _, err = run(capsys, *search)
    db = tmp_path / "s" / "search.db"
    assert code == 130 and f"the finished Pareto points are kept in {db}; the same command resumes" in err

    calibrate = ["calibrate", "--model", model_dir, "--source", "synthetic:passkey", "--lengths", 320,
                 "--per-length", 2, "--max-new-tokens", 3, "--checkpoint-every", 1, "--device", "cpu"]
    interrupt_on_call(monkeypatch, C, "_trim", 2)      # after the first answer was kept
    code, _, err = run(capsys, *calibrate, "-o", tmp_path / "cal")
    kept = C.answers_checkpoint(tmp_path / "cal")
    assert code == 130, err
    assert code == 130 and f"the answers so far are kept in {kept}; the same command answers only the rest" in err
    interrupt_on_call(monkeypatch, C, "_trim", 1)      # before any answer was kept
    code, _, err = run(capsys, *calibrate, "-o", tmp_path / "cal2")
    assert code == 130 and "no answers were kept yet" in err and not C.answers_checkpoint(tmp_path / "cal2").exists()


def test_openmp_waits_passively_unless_the_user_says(capsys, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["plan", "schema"]) == 0 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["plan", "schema"]) == 0 and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
