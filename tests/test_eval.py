"""`moa eval`: metrics against hand computations on a tiny random model."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moa_search import eval as E
from moa_search.plan import ModelShape

TOKENIZER = Path(__file__).resolve().parents[1] / "moa_search" / "demo_model"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, attn_implementation="sdpa",
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def _items():
    return [
        {"id": "a", "task": "passkey", "length": 64, "depth": 0.1,
         "prompt": "The pass key is 12345. Some filler text here.\nAnswer: The pass key is", "reference": "12345"},
        {"id": "b", "task": "kv_retrieval", "length": 64, "depth": 0.9,
         "prompt": "line apple-river: REGISTER_CONTENT is 55555\nAnswer: it is", "reference": "55555"},
    ]


def _hand_loss(model, tok, item) -> tuple[float, bool]:
    """float64 mean -log p(reference tokens | prompt, earlier reference tokens), one item, no padding,
    and whether the argmax matches at every reference position."""
    p = tok(item["prompt"])["input_ids"]
    r = tok(" " + item["reference"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    total, hit = 0.0, True
    for t in range(len(r)):
        pos = len(p) + t - 1           # logits at pos predict token pos + 1
        total -= float(logp[pos, r[t]])
        hit &= int(logits[pos].argmax()) == r[t]
    return total / len(r), hit


def test_response_masked_loss_equals_hand_computation_with_padding(model, tok):
    items = _items()
    rows = E.score_batch(model, tok, items, metrics=("retrieval", "ppl"), mode="forced")  # one padded batch
    for it, row in zip(items, rows):
        loss, hit = _hand_loss(model, tok, it)
        assert row["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-4)
        assert row["correct"] == hit
        assert row["n_answer"] == len(tok(" " + it["reference"], add_special_tokens=False)["input_ids"])


def test_response_losses_only_masked_positions():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    got = E.response_losses(logits, targets, mask)
    for b in range(2):
        sel = mask[b]
        want = F.cross_entropy(logits[b][sel], targets[b][sel])
        assert float(got[b]) == pytest.approx(float(want), rel=1e-6)


def test_forced_correct_by_hand():
    logits = torch.zeros(2, 3, 4)
    targets = torch.tensor([[1, 2, 3], [1, 2, 3]])
    mask = torch.tensor([[False, True, True], [False, True, True]])
    logits[0, 1, 2] = logits[0, 2, 3] = 5.0          # row 0: argmax right at both masked positions
    logits[1, 1, 2] = 5.0
    logits[1, 2, 0] = 5.0                            # row 1: wrong at the last one
    logits[:, 0, 0] = 9.0                            # unmasked position: ignored
    assert E.forced_correct(logits, targets, mask).tolist() == [True, False]


def test_generate_mode_matches_manual_greedy_loop(model, tok):
    from moa_search.calibration_data.tasks import is_correct

    items = _items()
    rows = E.score_batch(model, tok, items, metrics=("retrieval",), mode="generate")
    for it, row in zip(items, rows):
        ids = tok(it["prompt"], return_tensors="pt")["input_ids"]
        out = []
        with torch.no_grad():
            for _ in range(E.MAX_NEW_TOKENS):  # no cache, no padding: the plain definition of greedy
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        want = tok.decode(out, skip_special_tokens=True)
        # a plain-text prompt's answer is its first line (text after the first newline that
        # follows some answer text is another line, not the answer)
        lead = len(want) - len(want.lstrip())
        cut = want.find("\n", lead)
        want = want if cut < 0 else want[:cut]
        assert row["answer"] == want
        assert row["correct"] == is_correct(want, it["reference"])


def test_answers_through_the_compressed_cache_match_transformers_loop(tok):
    """On CUDA eval decodes a plan's answers with moa_search.generate (compressed cache, graph);
    its CPU twin (loop="static") must give the answers of transformers' generate with the
    plan's attention over a full cache: left padding, a fixed-window plan narrower than the prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moa_search.apply import apply_plan, remove_plan

    torch.manual_seed(0)   # larger weights than the module's model: answers vary from token to token
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, attn_implementation="sdpa", initializer_range=0.2,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    prompts = [tok(it["prompt"])["input_ids"] for it in _items()]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dense = E.generate_answers_text(model, tok, prompts, pad, None, 12)
    plan = E.Config("uniform@0.5", uniform_density=0.5, sink=4).plan_at(ModelShape.from_config(model.config), 32)
    apply_plan(model, plan, backend="reference")
    try:
        got = E.generate_answers_text(model, tok, prompts, pad, None, 12, compressed=True)
        want = E.generate_answers_text(model, tok, prompts, pad, None, 12, compressed=False)
    finally:
        remove_plan(model)
    assert len(set(map(len, prompts))) > 1 and min(map(len, prompts)) > 16   # padding; the window evicts
    assert got == want
    assert got != dense                               # the plan's eviction shows in the answers


def test_exact_match_scoring():
    from moa_search.calibration_data.tasks import is_correct

    assert is_correct(" 71432.", "71432")
    assert not is_correct(" 714321", "71432")
    assert is_correct(" QKZMT PLWRA JXNEB and", "QKZMT PLWRA JXNEB")
    assert not is_correct(" QKZMT PLWRA", "QKZMT PLWRA JXNEB")


def test_uniform_plan_has_requested_kv_density(model):
    shape = ModelShape.from_config(model.config)
    cfg = E.Config("uniform@0.5", uniform_density=0.5, sink=16)
    for n in (256, 1000, 4096):
        plan = cfg.plan_at(shape, n)
        assert plan.densities(n)["kv_density"] == pytest.approx(0.5, abs=1 / n)
        assert plan.distinct_rules() == 1


def test_full_density_uniform_plan_reproduces_dense(model, tok):
    """A uniform plan keeping every token (density 1) must give dense's losses; a narrow one must not."""
    items = _items()
    configs = [E.Config("dense"), E.Config("uniform@1", uniform_density=1.0, sink=4),
               E.Config("uniform@0.2", uniform_density=0.2, sink=4)]
    rows = E.run_configs(model, tok, configs, items, metrics=("ppl",), batch_size=2, mode="forced",
                         backend="reference", progress=False)
    by = {(r["config"], r["id"]): r["loss"] for r in rows}
    for it in items:
        assert by[("uniform@1", it["id"])] == pytest.approx(by[("dense", it["id"])], rel=1e-4, abs=1e-5)
        assert abs(by[("uniform@0.2", it["id"])] - by[("dense", it["id"])]) > 1e-4
    assert getattr(model, "moa_plan", None) is None     # the model is left dense


def test_aggregate_by_length_and_depth():
    rows = []
    # length 100: 3 of 4 right; depths 0.05, 0.15 (bin 0) and 0.95 (bin 4), 0.5 (bin 2)
    for i, (d, ok, loss) in enumerate([(0.05, True, 1.0), (0.15, False, 3.0), (0.95, True, 2.0), (0.5, True, 2.0)]):
        rows.append({"config": "dense", "length": 100, "task": "t", "depth": d, "correct": ok, "loss": loss,
                     "kv_density": 1.0, "compute_density": 1.0, "n_prompt": 90 + 2 * i})
    table = E.aggregate(rows, bins=5)
    main = E.overall(table)
    assert len(main) == 1
    assert main[0]["accuracy"] == pytest.approx(0.75)
    assert main[0]["loss"] == pytest.approx(2.0)
    assert main[0]["ppl"] == pytest.approx(math.exp(2.0))
    assert main[0]["prompt_tokens"] == pytest.approx(93.0)
    cell = {r["depth_bin"]: r for r in table if r["task"] == "all"}
    assert cell["0.0-0.2"]["accuracy"] == pytest.approx(0.5) and cell["0.0-0.2"]["n"] == 2
    assert cell["0.8-1.0"]["accuracy"] == 1.0


def test_moa_eval_cli_writes_tables_and_plots(model, tok, tmp_path, capsys):
    from moa_search.cli import main

    mdir = tmp_path / "m"
    model.save_pretrained(str(mdir))
    tok.save_pretrained(str(mdir))
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in _items()))
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(mdir), "--dense", "--uniform-density", "0.5", "--sink", "4",
               "--data", str(data), "--lengths", "64", "--retrieval-mode", "forced", "-o", str(out)])
    assert rc == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    configs = {r["config"] for r in rows}
    assert configs == {"dense", "uniform@0.5"}
    assert {r["length"] for r in rows} == {"64"}
    for name in ("accuracy_vs_length.png", "ppl_vs_length.png", "depth_heatmaps.png", "items.csv", "summary.json"):
        assert (out / name).stat().st_size > 0
    # a length the data lacks is an error that names the lengths present
    capsys.readouterr()
    rc = main(["eval", "--model", str(mdir), "--dense", "--data", str(data), "--lengths", "128", "-o", str(out)])
    assert rc == 2
    assert "no items of length 128 (lengths present: [64])" in capsys.readouterr().err


def test_default_eval_items_are_built_in_model_tokens(tok):
    """No --data: the held-out recipe at the asked lengths, counted with the model's tokenizer."""
    items = E.eval_items(tok, [300, 600], per_length=2)
    assert len(items) == 2 * 3 * 2                       # lengths x tasks x per_length
    assert {it["depth"] for it in items} == {0.0, 1.0}
    for it in items:
        n = len(tok(it["prompt"], add_special_tokens=False)["input_ids"])
        assert abs(n - it["length"]) <= 25, (it["id"], n)   # whole lines: within about half a line
    again = E.eval_items(tok, [300], per_length=2)
    assert [it["prompt"] for it in again] == [it["prompt"] for it in items if it["length"] == 300]


# ----------------------------------------------------------------------------- chat models (issue 19)

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture()
def chat_tok(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = CHAT
    return t


def test_chat_prompt_puts_the_cue_in_the_assistant_turn_and_scores_the_answer_there(model, chat_tok):
    item = {"prompt": "Filler.\nThe pass key is 12345.\nQuestion: What is the pass key?\nAnswer: The pass key is",
            "reference": "12345"}
    p, r = E._tokenize(chat_tok, item["prompt"], item["reference"])
    text = chat_tok.decode(p)
    assert text.endswith("Question: What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    assert "Answer:" not in text and chat_tok.decode(r) == " 12345"
    # the response-masked loss is the reference's loss right after the cue, by hand
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    hand = -sum(float(logp[len(p) + t - 1, r[t]]) for t in range(len(r))) / len(r)
    row = E.score_batch(model, chat_tok, [item], metrics=("ppl",))[0]
    assert row["loss"] == pytest.approx(hand, rel=1e-4, abs=1e-4)
    # --no-chat-template: the plain prompt, cue line included, as the builders wrote it
    p2, r2 = E._tokenize(chat_tok, item["prompt"], item["reference"], chat=False)
    assert p2 == chat_tok(item["prompt"])["input_ids"] and r2 == r


def test_built_prompts_never_exceed_their_length_with_a_chat_template(chat_tok):
    from moa_search.calibrate import prompt_ids

    room = 48
    for it in E.eval_items(chat_tok, [300, 700], per_length=3, answer_room=room):
        n = len(prompt_ids(chat_tok, it["prompt"]))
        assert n + room <= it["length"], (it["id"], n)
        assert n + room >= it["length"] - 40            # and not far below (whole lines)


def test_a_task_dense_fails_is_kept_out_of_the_headline():
    def row(config, task, length, correct):
        return {"config": config, "task": task, "length": length, "depth": 0.5, "correct": correct, "loss": 1.0,
                "n_prompt": 10, "kv_density": 1.0, "compute_density": 1.0}

    rows = ([row("dense", "passkey", 1024, c) for c in (True, True, False, True)]
            + [row("dense", "kv_retrieval", 1024, False) for _ in range(4)]
            + [row("plan", "passkey", 1024, c) for c in (True, False, False, True)]
            + [row("plan", "kv_retrieval", 1024, c) for c in (True, False, False, False)])
    table = E.aggregate(rows, bins=5)
    head = {r["config"]: r for r in E.overall(table, "headline")}
    alls = {r["config"]: r for r in E.overall(table)}
    assert head["dense"]["accuracy"] == 0.75 and head["plan"]["accuracy"] == 0.5    # passkey only
    assert alls["dense"]["accuracy"] == 0.375 and alls["plan"]["accuracy"] == 0.375  # everything
    notes = E.beyond_model_notes(table)
    assert len(notes) == 1 and notes[0].startswith("kv_retrieval at 1024: dense accuracy 0.00")


def test_sink_share_warning():
    shape = ModelShape("LlamaForCausalLM", "llama", 2, 4, 2, 16)
    from moa_search.plan import sink_share_warnings, uniform_plan

    p = uniform_plan(shape, sink=64, span_tokens=100)
    p.budget = {"kind": "kv", "density": 0.25, "lengths": [512, 1024]}
    p.profiled_lengths = [512, 1024]
    (w,) = sink_share_warnings(p, "moa0.25")
    assert "64-token sink takes 50% of the KV budget at the shortest profiled length 512" in w
    p.profiled_lengths = [2048, 4096]                     # 64 of 512 tokens: 12%, no warning
    assert sink_share_warnings(p) == []


def test_document_perplexity_on_stdlib_source(model, tok):
    docs = E.doc_items(tok, [96], per_length=2, seed=0)
    assert len(docs) == 2 and all(len(d["input_ids"]) == 96 for d in docs)
    assert docs[0]["input_ids"] != docs[1]["input_ids"]
    again = E.doc_items(tok, [96], per_length=2, seed=0)                 # the same tokens every time
    assert [d["input_ids"] for d in again] == [d["input_ids"] for d in docs]
    d = docs[0]
    ids = torch.tensor([d["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    hand = float(F.cross_entropy(logits[47:], ids[0, 48:]))              # second half: tokens 48..95
    got = E.score_document(model, d)
    assert got["loss"] == pytest.approx(hand, rel=1e-4) and got["n_answer"] == 48


def test_a_run_cut_short_resumes_from_its_progress_file(model, tok, tmp_path, monkeypatch):
    """Finished (config, length) results are taken from progress.jsonl, not scored again; a
    changed plan, a half-written line or other items are scored again."""
    items = _items()
    progress = tmp_path / "progress.jsonl"
    configs = [E.Config("dense"), E.Config("uniform@0.5", uniform_density=0.5, sink=4)]
    first = E.run_configs(model, tok, configs, items, metrics=("ppl",), batch_size=2, mode="forced",
                          backend="reference", progress=False, resume=progress)
    assert len(progress.read_text().splitlines()) == 2

    calls = []
    real = E.evaluate_items
    monkeypatch.setattr(E, "evaluate_items", lambda *a, **k: calls.append(1) or real(*a, **k))
    import moa_search.plan as P

    made = P.provenance
    monkeypatch.setattr(P, "provenance", lambda **e: {**made(**e), "created": "a minute later"})  # the uniform plan's
    again = E.run_configs(model, tok, configs, items, metrics=("ppl",), batch_size=2, mode="forced",
                          backend="reference", progress=False, resume=progress)
    assert calls == [] and [r["loss"] for r in again] == [r["loss"] for r in first]

    other = [E.Config("uniform@0.5", uniform_density=0.5, sink=8)]       # same name, another plan
    E.run_configs(model, tok, other, items, metrics=("ppl",), batch_size=2, mode="forced",
                  backend="reference", progress=False, resume=progress)
    assert len(calls) == 1
    with open(progress, "a") as f:                                       # a crash in the middle of a line
        f.write('{"key": "x", "rows": [')
    E.run_configs(model, tok, configs[:1], items[:1], metrics=("ppl",), batch_size=2, mode="forced",
                  backend="reference", progress=False, resume=progress)
    assert len(calls) == 2                                               # fewer items: another key
    E.run_configs(model, tok, configs[:1], items[:1], metrics=("ppl",), batch_size=2, mode="forced",
                  backend="reference", progress=False, resume=progress)
    assert len(calls) == 2                         # the line after the broken one was written whole

    import copy

    retrained = copy.deepcopy(model)                                     # same folder and config, other weights
    with torch.no_grad():
        next(retrained.parameters()).mul_(1.5)
    E.run_configs(retrained, tok, configs[:1], items[:1], metrics=("ppl",), batch_size=2, mode="forced",
                  backend="reference", progress=False, resume=progress)
    assert len(calls) == 3
