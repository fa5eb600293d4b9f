"""Calibration: synthetic task builders, sources, `moa calibrate` on a tiny random Llama.

The builders are checked by independent solvers that parse the prompt text (resolve every
VAR chain, read every register line), not by re-running builder code.
"""
from __future__ import annotations

import json
import random
import re

import pytest

from moa_search.calibration_data import defaults, tasks
from moa_search.calibration_data.tasks import approx_count_tokens, build_items, is_correct, make_item

TASK_NAMES = list(tasks.TASKS)


# ----------------------------------------------------------------------------- independent solvers


def solve_kv(prompt: str) -> tuple[str, dict]:
    table = {}
    for key, value in re.findall(r"^line (\S+): REGISTER_CONTENT is (\d+)$", prompt, flags=re.M):
        assert key not in table, f"duplicate key {key}"
        table[key] = value
    asked = re.search(r"^Question: What is the REGISTER_CONTENT in line (\S+)\?$", prompt, flags=re.M).group(1)
    assert len(set(table.values())) == len(table), "values must be unique so exact match is meaningful"
    return table[asked], table


def solve_passkey(prompt: str) -> str:
    keys = set(re.findall(r"The pass key is (\d+)\.", prompt))
    assert len(keys) == 1
    return keys.pop()


def solve_vars(prompt: str) -> str:
    value_of = {}
    order = []
    for name, rhs in re.findall(r"^VAR ([A-Z]+) = (\S+)$", prompt, flags=re.M):
        assert name not in value_of
        value_of[name] = rhs if rhs.isdigit() else value_of[rhs]  # a hop must follow its source
        order.append(name)
    asked = re.search(r"assigned the value (\d+) in the text above", prompt).group(1)
    return " ".join(n for n in order if value_of[n] == asked)


SOLVERS = {"kv_retrieval": lambda p: solve_kv(p)[0], "passkey": solve_passkey, "var_tracking": solve_vars}
NEEDLE = {  # the line holding the needed fact (for var_tracking: the chain's first line)
    "kv_retrieval": lambda p, ref: p.index(f": REGISTER_CONTENT is {ref}\n"),
    "passkey": lambda p, ref: p.index(f"The pass key is {ref}."),
    "var_tracking": lambda p, ref: p.index(f"VAR {ref.split()[0]} = "),
}


# ----------------------------------------------------------------------------- builders


@pytest.mark.parametrize("task", TASK_NAMES)
def test_builder_answer_solvable_and_at_depth(task):
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        it = make_item(task, random.Random(f"t-{depth}"), 4096, approx_count_tokens, depth)
        p, ref = it["prompt"], it["reference"]
        assert it["task"] == task and it["depth"] == depth and p.isascii()
        assert SOLVERS[task](p) == ref
        # prompt ends with the question and an answer cue (the model continues with " <ref>")
        assert p.splitlines()[-2].startswith("Question:") and p.splitlines()[-1].startswith("Answer:")
        assert not p.endswith("\n")
        # position of the needed fact, in tokens, relative to the prompt
        pos = approx_count_tokens(p[: NEEDLE[task](p, ref)]) / approx_count_tokens(p)
        assert abs(pos - depth) < 0.04, (task, depth, pos)


def test_var_tracking_chain_order_and_distractors():
    it = make_item("var_tracking", random.Random(5), 2048, approx_count_tokens, 0.3, hops=4, distractors=2)
    names = it["reference"].split()
    assert len(names) == 4 and solve_vars(it["prompt"]) == it["reference"]
    assert len(re.findall(r"^VAR ", it["prompt"], flags=re.M)) == 12  # 3 chains of 4


def test_exact_match_scoring():
    assert is_correct(" 71432.", "71432") and is_correct("is 71432", "71432")
    assert not is_correct(" 714321", "71432") and not is_correct("171432", "71432") and not is_correct("", "71432")
    assert is_correct(" AB CD EF.", "AB CD EF") and not is_correct(" AB EF CD", "AB CD EF")
    # in a kv prompt every other line's value is a wrong answer
    it = make_item("kv_retrieval", random.Random(3), 512, approx_count_tokens, 0.5)
    ref, table = solve_kv(it["prompt"])
    assert ref == it["reference"] and len(table) > 20
    assert sum(is_correct(f" {v}.", ref) for v in table.values()) == 1


def test_builders_deterministic_and_stable_ids():
    a = build_items(TASK_NAMES, [512, 1024], 3, seed=7)
    b = build_items(TASK_NAMES, [512, 1024], 3, seed=7)
    c = build_items(TASK_NAMES, [512, 1024], 3, seed=8)
    assert a == b and a != c
    assert [x["id"] for x in a] == [f"{t}-{n}-{k}" for t in TASK_NAMES for n in (512, 1024) for k in range(3)]
    assert [x["depth"] for x in a[:3]] == [0.0, 0.5, 1.0]
    # an item does not depend on which other tasks/lengths are in the build
    only = build_items(["passkey"], [1024], 3, seed=7)
    assert only == [x for x in a if x["task"] == "passkey" and x["length"] == 1024]
    with pytest.raises(ValueError, match="unknown task"):
        build_items(["nope"], [512], 1, 0)


def test_builders_too_short_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        make_item("var_tracking", random.Random(0), 40, approx_count_tokens, 0.5)
    with pytest.raises(ValueError, match="depth"):
        make_item("passkey", random.Random(0), 512, approx_count_tokens, 1.5)


def test_shipped_default_sets_match_recipes():
    """The shipped files are exactly their recipes, counted with the recorded tokenizer."""
    tok = defaults.recorded_tokenizer()
    if tok is not None:
        assert (defaults.resolve_tokenizer(tok) / "tokenizer.json").exists(), f"shipped sets were counted with {tok}"
    assert defaults.check_defaults(tokenizer=tok) == []
    for name in defaults.RECIPES:
        path = defaults.HERE / defaults.RECIPES[name]["file"]
        assert path.stat().st_size < 2_000_000
    cal, ev = defaults.load_default("calibration"), defaults.load_default("eval")
    assert not {x["prompt"] for x in cal} & {x["prompt"] for x in ev}  # held out
    for it in cal[:6] + ev[-6:]:
        assert SOLVERS[it["task"]](it["prompt"]) == it["reference"]


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A BPE tokenizer trained on builder text and a random 2-layer GQA Llama, saved."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    corpus = [x["prompt"] for x in build_items(TASK_NAMES, [400], 4, seed=123)] + [" ".join(tasks.WORDS)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])  # BOS
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    # a random model may say EOS or a newline first; keep answers non-empty for the span checks
    newline = [i for t, i in tok.get_vocab().items() if "Ċ" in t]
    model.generation_config.suppress_tokens = [tok.eos_token_id] + newline
    model.save_pretrained(folder)
    return folder, model, tok


def test_builder_lengths_with_real_tokenizer(tiny):
    _, _, tok = tiny
    count = lambda s: len(tok(s).input_ids)  # noqa: E731  (BOS included: the builder subtracts it)
    for item in build_items(TASK_NAMES, [300, 1000], 2, seed=1, count_tokens=count):
        n = len(tok(item["prompt"], add_special_tokens=False).input_ids)
        assert item["length"] - max(0.03 * item["length"], 30) <= n <= item["length"] + 2, (item["id"], n)


def test_generate_answers_spans_and_padding(tiny):
    from moa_search.calibrate import generate_answers, prompt_ids

    _, model, tok = tiny
    items = build_items(["passkey", "kv_retrieval"], [120, 200, 300], 1, seed=2)
    batched = generate_answers(model, tok, items, max_new_tokens=6, batch_size=3, progress=False)
    single = generate_answers(model, tok, items, max_new_tokens=6, batch_size=1, progress=False)
    assert batched["answer"] == single["answer"] and batched["input_ids"] == single["input_ids"]
    assert len(batched) == len(items)
    for row, it in zip(batched, items):
        s, e, ids = row["response_start"], row["response_end"], row["input_ids"]
        assert ids[:s] == prompt_ids(tok, it["prompt"]) and ids[0] == tok.bos_token_id
        assert 0 < s < e == len(ids) == row["n_tokens"] and e - s <= 6
        assert tok.decode(ids[s:e]) == row["answer"]
        # the answer is the model's own greedy continuation: compare with a plain generate call
        import torch

        ref = model.generate(torch.tensor([ids[:s]]), max_new_tokens=e - s, do_sample=False)[0, s:].tolist()
        assert ref == ids[s:e]
        keys = ("id", "task", "length", "reference")
        assert [row[k] for k in keys] == [it[k] for k in keys]


def test_trim_at_eos_and_newline(tiny):
    from moa_search.calibrate import _trim

    _, _, tok = tiny
    a = tok(" 12345", add_special_tokens=False).input_ids
    nl = tok("\nline", add_special_tokens=False).input_ids
    eos = {tok.eos_token_id}
    assert _trim(a + [tok.eos_token_id] + a, tok, eos, False) == a
    assert _trim(a + nl, tok, eos, True) == a
    assert _trim(a + nl, tok, eos, False) == a + nl
    lead = tok("\n", add_special_tokens=False).input_ids
    assert _trim(lead + a + nl, tok, eos, True) == lead + a  # a newline before any answer text is kept


def test_newline_stopping_criterion(tiny):
    import torch

    from moa_search.calibrate import _newline_stop

    _, _, tok = tiny
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    prompt = enc("Answer: The pass key is")
    rows = [prompt + enc(" 123\nline"), prompt + enc("\n 123"), prompt + enc(" 123 45")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    assert _newline_stop(tok, len(prompt))(ids, None).tolist() == [True, False, False]


def test_chat_template_applied(tiny):
    from moa_search.calibrate import generate_answers

    _, model, tok = tiny
    tok = type(tok).from_pretrained(tiny[0])
    tok.chat_template = ("{% for m in messages %}[user] {{ m['content'] }} [/user]{% endfor %}"
                         "{% if add_generation_prompt %}[bot]{% endif %}")
    items = build_items(["passkey"], [150], 1, seed=0)
    row = generate_answers(model, tok, items, max_new_tokens=4, progress=False)[0]
    s = row["response_start"]
    prompt_text = tok.decode(row["input_ids"][:s])
    # the question stays in the user turn; the answer cue opens the assistant turn, where the
    # model writes its answer (and where the profile takes its loss)
    assert prompt_text.startswith("[user] There is a pass key")
    assert prompt_text.endswith("Question: What is the pass key? [/user][bot]The pass key is")
    assert "Answer:" not in prompt_text
    assert tok.decode(row["input_ids"][s:]) == row["answer"]
    # --no-chat-template: the prompt exactly as written, cue line included
    plain = generate_answers(model, tok, items, max_new_tokens=4, progress=False, chat=False)[0]
    assert plain["input_ids"][:plain["response_start"]] == tok(items[0]["prompt"]).input_ids


def test_cli_calibrate_end_to_end(tiny, tmp_path, capsys):
    from moa_search.calibrate import calibration_hash, load_calibration, load_meta
    from moa_search.cli import main
    from moa_search.plan import ModelShape

    folder, _, tok = tiny
    out = tmp_path / "cal"
    rc = main(["calibrate", "--model", str(folder), "--source", "synthetic:passkey,var_tracking",
               "--lengths", "256,512", "--per-length", "2", "--max-new-tokens", "8", "--batch-size", "2",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    ds = load_calibration(out)
    meta = load_meta(out)
    assert len(ds) == 8 and sorted(set(ds["length"])) == [256, 512]
    assert meta["calibration_hash"] == calibration_hash(ds)
    assert meta["fingerprint"] == ModelShape.from_pretrained(folder).fingerprint
    assert meta["lengths"] == [256, 512] and meta["seeds"] == {"builder": 0}
    for row in ds:
        # prompt + answer room fits the target length (line granularity: a few tokens over at most)
        # (line counts add up to the prompt's count within a token or two under BPE)
        assert row["response_start"] + 8 <= row["length"] + 2 and row["n_tokens"] <= row["length"] + 2
        assert row["response_start"] >= 0.9 * row["length"] - 8
        assert tok.decode(row["input_ids"][row["response_start"]:row["response_end"]]) == row["answer"]
    # the same command again gives the same set (greedy, seeded), and refuses to overwrite silently
    assert main(["calibrate", "--model", str(folder), "--source", "synthetic:passkey,var_tracking",
                 "--lengths", "256,512", "--per-length", "2", "--max-new-tokens", "8", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    out2 = tmp_path / "cal2"
    assert main(["calibrate", "--model", str(folder), "--source", "synthetic:passkey,var_tracking",
                 "--lengths", "256,512", "--per-length", "2", "--max-new-tokens", "8", "-o", str(out2)]) == 0
    assert calibration_hash(load_calibration(out2)) == meta["calibration_hash"]


def test_user_sources(tiny, tmp_path):
    import datasets

    from moa_search.calibrate import calibrate

    folder, model, tok = tiny
    filler = " ".join(tasks.FILLER) + "\n"
    long_doc = "START of the doc.\n" + filler * 30 + "END of the doc."
    recs = [{"context": long_doc, "question": "How does the doc end?", "reference": "END", "id": "doc"},
            {"context": "Too short.", "question": "Anything?"},
            {"prompt": "The sky is blue. What colour is the sky?", "answer": "blue"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds, meta = calibrate(model, tok, str(path), lengths=[128, 256], max_new_tokens=4, progress=False)
    by_id = {r["id"]: r for r in ds}
    assert set(by_id) == {"doc@128", "doc@256", "mine-2"}
    for L in (128, 256):
        r = by_id[f"doc@{L}"]
        assert r["prompt"].startswith("START") and r["prompt"].endswith("END of the doc.\n\nHow does the doc end?")
        assert L - 4 - 6 <= r["response_start"] <= L - 4 + 2  # cut in the middle to fill the length
    assert by_id["mine-2"]["length"] == 128 and by_id["mine-2"]["reference"] == "blue"
    assert meta["skipped"] == {"shorter than 128 tokens": 1, "shorter than 256 tokens": 1}
    # without lengths every record is used whole; its length leaves room for the answer
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in recs[1:]))
    whole, meta_whole = calibrate(model, tok, str(small), max_new_tokens=4, progress=False)
    assert len(whole) == 2 and meta_whole["over_length"] == 0
    assert all(r["response_start"] + 4 == r["length"] for r in whole)
    # the same records as parquet and as a saved dataset give the same items
    keys = sorted({k for r in recs for k in r})  # columnar formats: absent fields are nulls
    table = datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in recs])
    pq = tmp_path / "mine.parquet"
    table.to_parquet(str(pq))
    saved = tmp_path / "saved"
    table.save_to_disk(str(saved))
    for src in (pq, saved):
        ds2, _ = calibrate(model, tok, str(src), lengths=[128, 256], max_new_tokens=4, progress=False)
        assert sorted(ds2["prompt"]) == sorted(ds["prompt"])


def test_bad_inputs(tiny, tmp_path, capsys):
    import datasets

    from moa_search.calibrate import CalibrationError, calibrate, load_calibration
    from moa_search.cli import main

    folder, model, tok = tiny
    with pytest.raises(CalibrationError, match="maximum of 1024 positions"):
        calibrate(model, tok, "synthetic:passkey", lengths=[2048], progress=False)
    with pytest.raises(CalibrationError, match="too short"):
        calibrate(model, tok, "synthetic:var_tracking", lengths=[48], progress=False)
    with pytest.raises(CalibrationError, match="unknown task"):
        calibrate(model, tok, "synthetic:passkee", lengths=[256], progress=False)
    with pytest.raises(CalibrationError, match="no such file"):
        calibrate(model, tok, str(tmp_path / "absent.jsonl"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(CalibrationError, match=r"record 0: needs a 'prompt' or a 'context'"):
        calibrate(model, tok, str(bad), progress=False)
    bad.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(model, tok, str(bad), progress=False)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"context": "tiny doc"}) + "\n")
    with pytest.raises(CalibrationError, match="no calibration items left.*shorter than 512"):
        calibrate(model, tok, str(short), lengths=[512], progress=False)
    # a user prompt longer than the model's positions
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"prompt": "The grass is green. " * 400, "id": "big"}) + "\n")
    with pytest.raises(CalibrationError, match="item big: .* exceed the model's maximum"):
        calibrate(model, tok, str(huge), progress=False)
    # through the CLI: a clean message and exit code 2, no traceback
    assert main(["calibrate", "--model", str(folder), "--source", "synthetic:passkey", "--lengths", "4096",
                 "-o", str(tmp_path / "x")]) == 2
    assert "above the model's maximum" in capsys.readouterr().err

    with pytest.raises(CalibrationError, match="no such calibration folder"):
        load_calibration(tmp_path / "nothing")
    nospan = tmp_path / "nospan"
    datasets.Dataset.from_list([{"id": "a", "input_ids": [1, 2, 3]}]).save_to_disk(str(nospan))
    with pytest.raises(CalibrationError, match="missing response spans"):
        load_calibration(nospan)
    row = {"id": "a", "task": "t", "length": 4, "depth": -1.0, "prompt": "p", "reference": "", "answer": "x",
           "input_ids": [1, 2, 3, 4], "response_start": 3, "response_end": 4, "n_tokens": 4}
    empty = tmp_path / "empty"
    datasets.Dataset.from_list([row]).select([]).save_to_disk(str(empty))
    with pytest.raises(CalibrationError, match="empty"):
        load_calibration(empty)
    badspan = tmp_path / "badspan"
    datasets.Dataset.from_list([dict(row, response_end=9)]).save_to_disk(str(badspan))
    with pytest.raises(CalibrationError, match="invalid response span"):
        load_calibration(badspan)


def test_interrupted_run_resumes_on_two_ranks(tiny, tmp_path, monkeypatch):
    """Ctrl-C after 3 of 8 answers keeps them beside the output; the same command under
    torchrun with 2 gloo ranks (issue 8) answers only the other 5, dealt out to the ranks,
    and writes the same set as one uninterrupted process."""
    import moa_search.calibrate as C
    from moa_search.cli import main

    from helpers import interrupt_on_call, run_cli

    folder, _, _ = tiny
    base = ["calibrate", "--model", str(folder), "--source", "synthetic:passkey,var_tracking", "--lengths",
            "256,512", "--per-length", "2", "--max-new-tokens", "6", "--batch-size", "1",
            "--checkpoint-every", "1", "--device", "cpu"]
    assert main(base + ["-o", str(tmp_path / "one")]) == 0
    one = C.load_calibration(tmp_path / "one")
    assert len(one) == 8 and not C.answers_checkpoint(tmp_path / "one").exists()

    interrupt_on_call(monkeypatch, C, "_trim", 4)     # Ctrl-C while trimming the 4th answer
    out = tmp_path / "two"
    assert main(base + ["-o", str(out)]) == 130
    kept = json.loads(C.answers_checkpoint(out).read_text())["answers"]
    assert len(kept) == 3 and not out.exists()

    res = run_cli(base + ["-o", str(out)], ranks=2, port=29519)
    assert "resuming with 3 answer(s)" in res.stderr
    two = C.load_calibration(out)
    assert C.load_meta(out)["world_size"] == 2 and not C.answers_checkpoint(out).exists()
    assert C.calibration_hash(two) == C.calibration_hash(one)
    assert two["answer"] == one["answer"] and two["input_ids"] == one["input_ids"]


def test_ranks_answer_every_other_batch(tiny, monkeypatch):
    """How the batches are dealt: as rank 1 of 2, generate_answers answers the 2nd, 4th, ...
    batch of the longest-first order, and takes the other rank's answers from the gather."""
    from moa_search import distributed
    from moa_search.calibrate import generate_answers, prompt_ids

    _, model, tok = tiny
    items = build_items(["passkey", "kv_retrieval"], [120, 200, 300], 1, seed=2)
    full = generate_answers(model, tok, items, max_new_tokens=4, batch_size=2, progress=False)
    by_len = sorted(range(len(items)), key=lambda i: -len(prompt_ids(tok, items[i]["prompt"])))
    answered = {}

    def gather(mine):   # rank 0's part: the answers rank 1 did not compute, from the one-process run
        answered.update(mine)
        other = {i: full[i]["input_ids"][full[i]["response_start"]:] for i in range(len(items)) if i not in mine}
        return [other, mine]

    monkeypatch.setattr(distributed, "info", lambda: (1, 2))
    monkeypatch.setattr(distributed, "gather", gather)
    got = generate_answers(model, tok, items, max_new_tokens=4, batch_size=2, progress=False, checkpoint_every=1)
    assert sorted(answered) == sorted(by_len[2:4]) and len(items) == 6   # batches 0,1,2: rank 1 has batch 1
    assert got["input_ids"] == full["input_ids"]


@pytest.mark.gpu
def test_gpu_nccl_two_ranks_write_the_one_gpu_set(tiny, tmp_path):
    """`moa calibrate` under torchrun on 2 GPUs (NCCL) writes the set one GPU writes."""
    import torch

    import moa_search.calibrate as C

    from helpers import run_cli

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    folder, _, _ = tiny
    base = ["calibrate", "--model", str(folder), "--source", "synthetic:passkey,var_tracking", "--lengths",
            "256,512", "--per-length", "2", "--max-new-tokens", "6", "--batch-size", "2", "--dtype", "float32"]
    run_cli(base + ["-o", str(tmp_path / "two")], ranks=2, port=29529)
    run_cli(base + ["-o", str(tmp_path / "one")], cuda_visible="0")
    one, two = C.load_calibration(tmp_path / "one"), C.load_calibration(tmp_path / "two")
    assert C.load_meta(tmp_path / "two")["world_size"] == 2
    assert C.calibration_hash(two) == C.calibration_hash(one)


def test_only_correct_keeps_the_items_answered_right(tiny, tmp_path, monkeypatch):
    """--only-correct drops the items whose answer misses the reference (items without one stay),
    counts them in meta, and refuses a set where nothing is left."""
    import moa_search.calibrate as C

    folder, model, tok = tiny
    real = C.generate_answers

    def answers_some_right(model, tokenizer, items, **kw):   # the model's text replaced: right on "a*" ids
        ds = real(model, tokenizer, items, **kw)
        return ds.map(lambda r: {"answer": f"it is {r['reference']}" if r["id"].startswith("a") else "no idea"})

    recs = [{"prompt": "The key is 11111. Key?", "reference": "11111", "id": "a1"},
            {"prompt": "The key is 22222. Key?", "reference": "22222", "id": "b1"},
            {"prompt": "The key is 33333. Key?", "reference": "33333", "id": "a2"},
            {"prompt": "Say something.", "id": "b-free"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.setattr(C, "generate_answers", answers_some_right)
    ds, meta = C.calibrate(model, tok, str(path), max_new_tokens=4, progress=False, only_correct=True)
    assert sorted(ds["id"]) == ["a1", "a2", "b-free"]
    assert meta["only_correct"] and meta["dropped_wrong"] == 1
    everything, meta_all = C.calibrate(model, tok, str(path), max_new_tokens=4, progress=False)
    assert len(everything) == 4 and meta_all["dropped_wrong"] == 0
    assert "--only-correct: 1 wrong" in C.answers_report(meta)

    path.write_text(json.dumps(recs[1]) + "\n")
    with pytest.raises(C.CalibrationError, match="answered no item right"):
        C.calibrate(model, tok, str(path), max_new_tokens=4, progress=False, only_correct=True)
