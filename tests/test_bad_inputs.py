"""Every `moa` subcommand given the mistakes a user makes: one clear line, no traceback.

One table of (arguments, what the last stderr line must name). Each case runs
`python -m moa_search.cli ...` in its own process, as a user would; the checks come before
any model work where they can, so the whole table takes seconds per case at most.
"""
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from moa_search.demo import embedded_model_dir
from moa_search.plan import ModelShape, save_plan, uniform_plan

OTHER = ModelShape("LlamaForCausalLM", "llama", 2, 4, 2, 16, "0123456789abcdef")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs a user could hand over by mistake, next to a few good ones."""
    import datasets
    import torch

    from moa_search.calibrate import COLUMNS, calibration_hash, save_calibration
    from moa_search.profiler.io import Profile, save_profile

    d = tmp_path_factory.mktemp("bad")
    demo = embedded_model_dir()
    shape = ModelShape.from_pretrained(demo)
    f = {"demo": demo, "dir": d}

    f["plan"] = save_plan(uniform_plan(shape, sink=16, span_fraction=0.5), d / "plan.json")
    text = f["plan"].read_text()
    (d / "half.json").write_text(text[: len(text) // 2])
    obj = json.loads(text)
    obj["rules"]["alpha"][1][0] = math.nan
    (d / "nan.json").write_text(json.dumps(obj))           # json writes NaN, as a hand edit or numpy would
    save_plan(uniform_plan(OTHER, sink=4, span_fraction=0.5), d / "other_model_plan.json")
    (d / "moa_half.json").write_text('{"alphas": [[1024.0, 10')

    (d / "empty.jsonl").write_text("")
    (d / "empty.json").write_text("\n")
    (d / "bad.jsonl").write_text('{"prompt": "the pass key is 1"}\n{"prompt": "the pass key is 2",\n')
    (d / "list.jsonl").write_text('["a", "b"]\n')
    (d / "notes.txt").write_text("not a model\n")

    nb = 256 // 64
    prof = Profile(torch.rand(shape.num_layers, shape.num_query_heads, nb, nb, dtype=torch.float64), 256, 64, 2, shape)
    good = save_profile(prof, d / "profiles" / "influence_256.safetensors")
    raw = good.read_bytes()
    (d / "cut").mkdir()
    (d / "cut" / "influence_256.safetensors").write_bytes(raw[: len(raw) // 2])

    # a calibration set that another model (OTHER) answered, as `moa calibrate` writes it
    ids = list(range(3, 40))
    row = {"id": "kv-0", "task": "kv_retrieval", "length": 64, "depth": 0.5, "prompt": "p", "reference": "1",
           "answer": "1", "input_ids": ids, "response_start": 30, "response_end": len(ids), "n_tokens": len(ids)}
    ds = datasets.Dataset.from_list([row])
    assert list(ds.column_names) == list(COLUMNS)
    save_calibration(ds, d / "calib_other", {"format": "moa-search-calibration", "version": 1,
                                             "model": {"path": "/models/other", **OTHER.__dict__},
                                             "fingerprint": OTHER.fingerprint, "calibration_hash": calibration_hash(ds)})
    (d / "full").mkdir()
    (d / "full" / "x").write_text("taken")
    return f


def cases(f):
    d, demo = f["dir"], str(f["demo"])
    plan, half, nan = str(f["plan"]), str(d / "half.json"), str(d / "nan.json")
    prof, cut, cal = str(d / "profiles"), str(d / "cut"), str(d / "calib_other")
    empty, bad, missing = str(d / "empty.jsonl"), str(d / "bad.jsonl"), str(d / "missing.jsonl")
    o = str(d / "out")
    return [
        # calibrate
        (["calibrate", "--model", str(d / "nope"), "-o", o], "nope: no such model directory"),
        (["calibrate", "--model", "gpt2", "-o", o], "gpt2: no such model directory"),
        (["calibrate", "--model", plan, "-o", o], "plan.json: not a directory"),
        (["calibrate", "--model", prof, "-o", o], "profiles: no config.json"),
        (["calibrate", "--model", demo, "--source", empty, "-o", o], "empty.jsonl: no records"),
        (["calibrate", "--model", demo, "--source", bad, "-o", o], "bad.jsonl, line 2: not valid JSON"),
        (["calibrate", "--model", demo, "--source", str(d / "empty.json"), "--lengths", "512", "-o", o],
         "empty.json: no records"),
        (["calibrate", "--model", demo, "--source", str(d / "list.jsonl"), "-o", o], "list.jsonl, line 1: expected a JSON object"),
        (["calibrate", "--model", demo, "--source", missing, "-o", o], "missing.jsonl: no such file or folder"),
        (["calibrate", "--model", demo, "--lengths", "512,abc", "-o", o], "--lengths: cannot read length 'abc'"),
        (["calibrate", "--model", demo, "--per-length", "0", "-o", o], "--per-length must be >= 1, got 0"),
        (["calibrate", "--model", demo, "-o", str(d / "full")], "full: exists and is not empty"),
        # profile
        (["profile", "--model", demo, "--data", cal, "--lengths", "64", "-o", o], "answered by another model"),
        (["profile", "--model", demo, "--data", prof, "--lengths", "256", "-o", o], "profiles: not a saved dataset"),
        (["profile", "--model", demo, "--data", str(d / "nope"), "--lengths", "256", "-o", o], "no such calibration folder"),
        (["profile", "--model", demo, "--data", empty, "--lengths", "256", "-o", o], "not a file"),
        (["profile", "--model", "gpt2", "--data", cal, "--lengths", "64", "-o", o], "gpt2: no such model directory"),
        (["profile", "--model", demo, "--data", cal, "--lengths", "512,abc", "-o", o], "--lengths: cannot read length 'abc'"),
        (["profile", "--model", demo, "--data", cal, "--lengths", "64", "--block-size", "0", "-o", o], "--block-size must be >= 1, got 0"),
        (["profile", "--model", demo, "--data", cal, "--lengths", "64", "--min-fill", "1.5", "-o", o], "--min-fill must be in [0, 1], got 1.5"),
        (["profile", "--model", demo, "--data", cal, "--lengths", "64", "--max-samples", "0", "-o", o], "--max-samples must be >= 1, got 0"),
        # search
        (["search", "--profiles", prof, "--budget", "0", "-o", o], "--budget must be in (0, 1], got 0"),
        (["search", "--profiles", prof, "--budget", "1.5", "-o", o], "--budget must be in (0, 1], got 1.5"),
        (["search", "--profiles", prof, "--budget", "0.5", "--extend-lengths", "512,abc", "-o", o], "--extend-lengths: cannot read length 'abc'"),
        (["search", "--profiles", prof, "--budget", "0.5", "--extend-lengths", "0,4k", "-o", o], "--extend-lengths: lengths must be positive"),
        (["search", "--profiles", prof, "--budget", "0.5", "--sink", "-1", "-o", o], "--sink must be >= 0, got -1"),
        (["search", "--profiles", prof, "--budget", "0.5", "--alpha-steps", "0", "-o", o], "--alpha-steps must be >= 1, got 0"),
        (["search", "--profiles", prof, "--budget", "0.5", "--betas", "0,x", "-o", o], "--betas: expected numbers"),
        (["search", "--profiles", prof, "--budget", "0.5", "--pareto-points", "0", "-o", o], "--pareto-points must be >= 1, got 0"),
        (["search", "--profiles", cal, "--budget", "0.5", "-o", o], "calib_other: no influence_*.safetensors files"),
        (["search", "--profiles", cut, "--budget", "0.5", "-o", o], "influence_256.safetensors: cannot read as safetensors"),
        (["search", "--profiles", prof, "--budget", "0.5", "--model", demo, "-o", o], "give --model and --validation together"),
        (["search", "--profiles", plan, "--budget", "0.5", "-o", o], "plan.json: a file; --profiles takes the folder"),
        (["search", "--profiles", prof, "--budget", "0.5", "--model", demo, "--validation", prof, "-o", o],
         "--validation " + prof + ": not a saved dataset"),
        # plan
        (["plan", "inspect", str(d / "nope.json")], "nope.json: no such plan file"),
        (["plan", "inspect", half], "half.json: not valid JSON"),
        (["plan", "inspect", nan], "nan.json: rules.alpha[1][0] (layer 1, head 0) must be a finite number, got nan"),
        (["plan", "inspect", str(d / "cut" / "influence_256.safetensors")], "influence_256.safetensors: not a JSON plan file"),
        (["plan", "inspect", plan, "--lengths", "512,abc"], "--lengths: cannot read length 'abc'"),
        (["plan", "convert", "--from-moa", str(d / "moa_half.json"), "--model", demo, "-o", o], "moa_half.json: not valid JSON"),
        (["plan", "convert", "--from-moa", str(d / "nope.json"), "--model", demo, "-o", o], "nope.json: no such file"),
        (["plan", "convert", "--from-moa", plan, "--model", "gpt2", "-o", o], "gpt2: no such model directory"),
        (["plan", "uniform", "--model", demo, "--span-fraction", "1.5", "-o", o], "--span-fraction must be in (0, 1], got 1.5"),
        (["plan", "uniform", "--model", demo, "--span-tokens", "0", "-o", o], "--span-tokens must be >= 1, got 0"),
        (["plan", "uniform", "--model", demo, "--sink", "-1", "--span-tokens", "8", "-o", o], "--sink must be >= 0, got -1"),
        (["plan", "uniform", "--model", prof, "--span-tokens", "8", "-o", o], "profiles: no config.json"),
        (["plan", "schema", "extra"], "unrecognized arguments: extra"),
        # generate
        (["generate", "--model", str(d / "nope"), "--dense", "--prompt", "hi"], "nope: no such model directory"),
        (["generate", "--model", demo, "--plan", nan, "--prompt", "hi"], "nan.json: rules.alpha[1][0]"),
        (["generate", "--model", demo, "--plan", str(d / "other_model_plan.json"), "--prompt", "hi", "--device", "cpu"],
         "num_layers: plan has 2, model has 8"),
        (["generate", "--model", demo, "--dense", "--prompt-file", missing], "missing.jsonl: no such prompt file"),
        (["generate", "--model", demo, "--dense", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        # eval
        (["eval", "--model", "gpt2", "--dense", "-o", o], "gpt2: no such model directory"),
        (["eval", "--model", demo, "--dense", "--lengths", "512,abc", "-o", o], "--lengths: cannot read length 'abc'"),
        (["eval", "--model", demo, "--dense", "--uniform-density", "1.5", "-o", o], "--uniform-density must be a density in (0, 1], got 1.5"),
        (["eval", "--model", demo, "--plan", half, "-o", o], "half.json: not valid JSON"),
        (["eval", "--model", demo, "--dense", "--data", empty, "--lengths", "256", "-o", o], "empty.jsonl: no items"),
        (["eval", "--model", demo, "--dense", "--data", bad, "--lengths", "256", "-o", o], "bad.jsonl, line 2: not valid JSON"),
        (["eval", "--model", demo, "--dense", "--per-length", "0", "-o", o], "--per-length must be >= 1, got 0"),
        (["eval", "--model", demo, "--dense", "--data", str(d / "list.jsonl"), "-o", o], "list.jsonl: item 0 is a list"),
        # bench
        (["bench", "prefill", "--lengths", "512,abc"], "--lengths: cannot read length 'abc'"),
        (["bench", "prefill", "--density", "1.5"], "--density must be a density in (0, 1], got 1.5"),
        (["bench", "prefill", "--plan", str(d / "nope.json")], "nope.json: no such plan file"),
        (["bench", "decode", "--device", "cpu", "--model-shape", "tiny", "--density", "0.5", "--prompt-len", "64",
          "--new-tokens", "4", "--steps", "16"], "--new-tokens (4) must be at least --steps + 2 (18)"),
        (["bench", "decode", "--device", "cpu", "--model-shape", "tiny", "--density", "1.5"], "--density must be in (0, 1], got 1.5"),
        (["bench", "decode", "--device", "cpu", "--model-shape", "tiny", "--plan", half], "half.json: not valid JSON"),
        (["bench", "nope"], "invalid choice: 'nope'"),
        # demo
        (["demo", "--lengths", "512,abc"], "--lengths: cannot read length 'abc'"),
        (["demo", "--budget", "0", "-o", o], "--budget must be in (0, 1], got 0"),
        (["demo", "--model", str(d / "nope"), "-o", o], "nope: no such model directory"),
        (["demo", "-o", plan], "plan.json: exists and is not a folder"),
    ]


def run(argv, timeout=120):
    """The command's result; one that is still working after `timeout` s did not stop at the bad input."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    try:
        return subprocess.run([sys.executable, "-m", "moa_search.cli", *argv], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, -9, "", f"(still running after {timeout} s) {e.stderr or ''}")


def test_bad_inputs_give_one_clear_line(files):
    table = cases(files)
    covered = {argv[0] + (" " + argv[1] if argv[0] in ("plan", "bench") else "") for argv, _ in table}
    assert covered >= {"calibrate", "profile", "search", "plan inspect", "plan convert", "plan uniform", "plan schema",
                       "generate", "eval", "bench prefill", "bench decode", "demo"}
    with ThreadPoolExecutor(3) as ex:   # processes wait on imports and files as much as on the CPU
        results = list(ex.map(lambda c: run(c[0]), table))
    wrong = []
    for (argv, expect), res in zip(table, results):
        lines = res.stderr.strip().splitlines()
        last = lines[-1] if lines else ""
        if res.returncode == 0 or "Traceback" in res.stderr or expect not in last:
            wrong.append(f"moa {' '.join(argv)}\n    exit {res.returncode}, expected {expect!r} in the last line:\n"
                         + "\n".join("    | " + line for line in res.stderr.strip().splitlines()[-6:]))
    assert not wrong, f"{len(wrong)} of {len(table)} cases:\n" + "\n".join(wrong)
