"""The `moa` command line, run as a user would (in-process through cli.main, and once as a subprocess)."""
import importlib.util
import json
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

    for name in COMMANDS:
        r = subprocess.run([sys.executable, "-m", "moa_search.cli", name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
        assert "usage: moa " + name in r.stdout
