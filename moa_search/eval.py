"""`moa eval`: retrieval accuracy and perplexity of dense vs plans, by length and by depth.

    moa eval --model M --dense --plan plan.json --uniform-density 0.5 \\
             --tasks retrieval,ppl --lengths 2048,4096,8192 -o eval_out/

Every configuration (dense, each --plan, each uniform density) runs on the same held-out
items (prompt, reference, task, length, depth):

  retrieval   greedy generation from the prompt (up to --max-new-tokens, to the end-of-turn
              token; plain-text prompts to the end of the answer's line); an item is right
              when the reference appears anywhere in the answer as whole words
              (calibration_data.tasks.is_correct).
              --retrieval-mode forced scores it from one teacher-forced pass instead:
              right when the argmax at every reference token is that token, which is what
              greedy decoding of the reference's length gives under prefill semantics,
              at the cost of one forward pass (used by `moa demo --quick` on the CPU).
  ppl         response-masked loss: the reference's tokens are appended to the prompt
              and the mean next-token cross-entropy is taken over them only; perplexity
              = exp(mean loss over the items of a length).
  doc_ppl     long-document perplexity on text every machine has: the Python standard
              library's source (files in a seeded order, concatenated to N tokens); the loss
              is taken on the second half of each document, where the context is N/2 to N
              tokens long and a plan's narrow heads no longer see all of it.
              --per-length documents per length (not in the default --tasks).

Chat models. When the tokenizer has a chat template the prompt is the user turn and the
answer cue (the prompt's last line, "Answer: The pass key is") opens the assistant turn
after the template's generation prompt, so the answer, and the reference whose perplexity
is taken, sit where the model would write them. --no-chat-template gives plain text to
compare. Built prompts never exceed their length: template, prompt and --max-new-tokens
of answer room fit in it.

Dense first. Where dense accuracy on a task is below 0.1 at a length, the task is beyond
the model there: the table says so instead of showing a row of zeros, and the headline
accuracy ("headline", the mean over the tasks dense can do at that length) leaves it out;
the per-task table keeps it.

Uniform baseline (--uniform-density D): StreamingLLM, every head keeps `--sink` first
tokens plus a fixed window; at each length N the window is round(D N) - sink, so that
its KV density (sink + window) / N equals D at every evaluated length (a fixed-window
plan per length, not one elastic plan).

Items: by default calibration_data's held-out eval recipe (defaults.RECIPES["eval"]: the
three tasks, seed 1, answers at evenly spread depths), built at each --lengths with the
model's own tokenizer, as `moa calibrate --source default` does for calibration; so any
length, e.g. twice the longest profiled one, is measured in the model's real tokens.
--data FILE takes fixed items instead (JSONL/JSON list, or a `datasets` dataset saved to
disk; e.g. calibration_data/default_eval.jsonl, whose lengths are approximate counts).

A run cut short (a crash, a time limit) keeps what it finished: each (config, length)
appends its item rows to -o DIR/progress.jsonl, and the same command again takes them from
there when model, items, settings and plan are unchanged (--restart: score everything).

Writes into -o DIR: results.csv (one row per config x length x task x depth bin, with
the densities), items.csv (every item's answer and loss), summary.json, and PNGs:
accuracy_vs_length.png, ppl_vs_length.png, depth_heatmaps.png (depth x length per config).
Uses apply_plan: Triton kernels on a GPU; on the CPU kernels/cpu_window.py (exactly the
reference's kept set, only the kept keys gathered). On the CPU the time does not fall with
the density (SmolLM2-135M at 4k: 28 s per item with a 0.5 plan, 34 s dense).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moa_search.apply import input_device
from moa_search.losses import response_loss, response_losses
from moa_search.plan import sink_share_warnings

METRICS = ("retrieval", "ppl", "doc_ppl")
DEFAULT_METRICS = ("retrieval", "ppl")


# ----------------------------------------------------------------------------- items


def reference_text(before: str, reference: str) -> str:
    """The continuation the model should write after the text `before`: the builders'
    references follow their answer cue after one space; an answer that opens a turn ("")
    or follows a space or newline starts with no space."""
    if reference[:1].isspace() or not before or before[-1:].isspace():
        return reference
    return " " + reference


def _tokenize(tok, prompt: str, reference: str, chat: bool | None = None) -> tuple[list[int], list[int]]:
    """Prompt ids (as `moa calibrate` builds them: the answer cue in the assistant turn under a
    chat template) and reference ids (no special tokens), tokenized apart so the reference's
    tokens are the same whatever precedes them."""
    from moa_search.calibrate import answer_follows, prompt_ids

    p = prompt_ids(tok, prompt, chat)
    r = tok(reference_text(answer_follows(prompt, tok, chat), reference), add_special_tokens=False)["input_ids"]
    if not r:
        raise ValueError(f"reference {reference!r} tokenizes to nothing")
    return list(p), list(r)


def read_items(path: str | Path) -> list[dict]:
    """Items from a JSONL/JSON file or a dataset saved with `datasets` (save_to_disk)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such eval data")
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict
            split = "test" if "test" in ds else ("validation" if "validation" in ds else list(ds.keys())[0])
            ds = ds[split]
        items = [dict(r) for r in ds]
    elif path.suffix == ".jsonl":
        from moa_search.calibration_data.defaults import read_jsonl

        items = read_jsonl(path)
    else:
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of items")
    for n, it in enumerate(items):
        if not isinstance(it, dict):
            raise ValueError(f"{path}: item {n} is a {type(it).__name__}, expected a JSON object")
        missing = [k for k in ("prompt", "reference", "length") if k not in it]
        if missing:
            raise ValueError(f"{path}: item {n} ({it.get('id', '?')}) lacks field(s) {missing}; eval items need "
                             "prompt, reference, length (and optionally id, task, depth)")
        it.setdefault("id", f"item-{n}")
        it.setdefault("task", "unknown")
        it.setdefault("depth", float("nan"))
    return items


def eval_items(tok, lengths: list[int], per_length: int | None, data: str | None = None, seed: int | None = None,
               tasks: list[str] | None = None, chat: bool | None = None, answer_room: int = 0) -> list[dict]:
    """Held-out items at `lengths`.

    data None: the default eval recipe (calibration_data.defaults.RECIPES["eval"]: its tasks
    and its held-out seed) built at each length with the model's own tokenizer, per_length
    items per task at evenly spread depths (default: the recipe's 5); every prompt as the
    model sees it (chat template included, see calibrate.prompt_ids) plus `answer_room`
    tokens fits its length. `seed` overrides the recipe's seed. data FILE/DIR: its items of
    each length (an error names the lengths it has), at most per_length per task, spread
    over depths.
    """
    if data is None:
        from moa_search.calibrate import prompt_ids, text_counter
        from moa_search.calibration_data import tasks as T
        from moa_search.calibration_data.defaults import RECIPES

        def excess(prompt: str, length: int) -> int:
            return len(prompt_ids(tok, prompt, chat)) + answer_room - length

        recipe = RECIPES["eval"]
        return T.build_items(tasks or recipe["tasks"], lengths, per_length or recipe["groups"][0]["per_length"],
                             recipe["seed"] if seed is None else seed, text_counter(tok), excess=excess)
    pool = read_items(data)
    if tasks:
        pool = [it for it in pool if it["task"] in tasks]
    out = []
    for n in lengths:
        have = [it for it in pool if int(it["length"]) == n]
        if not have:
            raise ValueError(f"{data}: no items of length {n} (lengths present: "
                             f"{sorted({int(it['length']) for it in pool})})")
        by_task: dict[str, list[dict]] = {}
        for it in have:
            by_task.setdefault(it["task"], []).append(it)
        for task, group in by_task.items():
            if per_length and len(group) > per_length:
                # keep depths spread: an evenly spaced subset of the depth-sorted items
                group = sorted(group, key=lambda it: it.get("depth", 0.0))
                idx = np.linspace(0, len(group) - 1, per_length).round().astype(int)
                group = [group[i] for i in idx]
            out.extend(group)
    return out


def stdlib_sources() -> list[Path]:
    """The Python standard library's .py files (tests and site-packages left out), sorted."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))


def doc_items(tok, lengths: list[int], per_length: int, seed: int = 0) -> list[dict]:
    """per_length documents of exactly N tokens per length: stdlib files in an order drawn from
    (seed, N, k), concatenated (plain text, no special tokens). The tokens are fixed here
    ("input_ids"), so every configuration scores the same ones."""
    import random

    files = stdlib_sources()
    if not files:
        raise ValueError("doc_ppl: no Python standard library source found (sysconfig's stdlib path)")
    items = []
    for n in lengths:
        for k in range(per_length):
            order = files[:]
            random.Random(f"{seed}-doc-{n}-{k}").shuffle(order)
            ids: list[int] = []
            names = []
            for f in order:
                text = f.read_text(encoding="utf-8", errors="replace")[: 8 * n]   # ~2-4 chars a token
                ids += tok(f"# {f.name}\n{text}\n", add_special_tokens=False)["input_ids"]
                names.append(f.name)
                if len(ids) >= n:
                    break
            items.append({"id": f"doc_ppl-{n}-{k}", "task": "doc_ppl", "length": int(n), "depth": float("nan"),
                          "prompt": " + ".join(names), "reference": "", "input_ids": ids[:n]})
    return items


@torch.no_grad()
def score_document(model, item: dict) -> dict:
    """Mean next-token loss over the second half of one document's tokens."""
    ids = torch.tensor([item["input_ids"]], device=input_device(model))
    start = ids.shape[1] // 2
    loss = response_loss(model, ids[0, start:], start, input_ids=ids)
    return {"n_prompt": start, "n_answer": ids.shape[1] - start, "loss": float(loss), "correct": None,
            "answer": ""}


# ----------------------------------------------------------------------------- metrics


def forced_correct(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """bool [B]: the argmax equals the target at every masked position (greedy reproduces it)."""
    ok = (logits.argmax(-1) == targets) | ~mask
    return ok.all(-1)


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        att[b, T - len(s):] = 1
    return ids.to(device), att.to(device)


PROGRESS = "progress.jsonl"   # in the output folder: finished (config, length) results, for a resumed run
MAX_NEW_TOKENS = 48   # room for a chat model's sentences around the answer (a var_tracking list: ~40 tokens)


@torch.no_grad()
def score_batch(model, tok, batch: list[dict], metrics=METRICS, mode: str = "generate", chat: bool | None = None,
                max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Per-item results for one batch: {correct, loss, answer, n_prompt, n_answer}."""
    device = input_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = [_tokenize(tok, it["prompt"], it["reference"], chat) for it in batch]
    out = [{"n_prompt": len(p), "n_answer": len(r), "loss": float("nan"), "correct": None, "answer": ""} for p, r in enc]
    need_forward = "ppl" in metrics or ("retrieval" in metrics and mode == "forced")
    if need_forward:
        ids, att = _left_pad([p + r for p, r in enc], pad, device)
        pos = (att.cumsum(-1) - 1).clamp_min(0)
        keep = max(len(r) for _, r in enc) + 1
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=keep).logits
        logits = logits[:, :-1]                           # predicts the last keep-1 tokens
        targets = ids[:, -(keep - 1):]
        mask = torch.zeros_like(targets, dtype=torch.bool)
        for b, (_, r) in enumerate(enc):
            mask[b, -len(r):] = True
        losses = response_losses(logits, targets, mask)
        hits = forced_correct(logits, targets, mask)
        for b in range(len(batch)):
            out[b]["loss"] = float(losses[b])
            if mode == "forced" and "retrieval" in metrics:
                out[b]["correct"] = bool(hits[b])
                out[b]["answer"] = tok.decode(logits[b].argmax(-1)[mask[b]].tolist())
    if "retrieval" in metrics and mode == "generate":
        from moa_search.calibration_data.tasks import is_correct

        for b, answer in enumerate(generate_answers_text(model, tok, [p for p, _ in enc], pad, chat,
                                                         max(max_new_tokens, max(len(r) for _, r in enc) + 4))):
            out[b]["answer"] = answer
            out[b]["correct"] = bool(is_correct(answer, batch[b]["reference"]))
    return out


def generate_answers_text(model, tok, prompts: list[list[int]], pad: int, chat: bool | None,
                          max_new_tokens: int, compressed: bool | None = None) -> list[str]:
    """Greedy answers, as text: to the end-of-turn token, and for plain-text prompts also to
    the end of the answer's first line (calibrate's rule: the model would go on with unrelated
    text, where another line's number could match by chance).

    compressed: decode with the plan's compressed cache through moa_search.generate (what a
    user of the plan runs; on CUDA one CUDA graph per token, many times faster than
    transformers' loop for small models). None: when a plan is applied and the model is on
    CUDA. Otherwise transformers' generate, the plan's attention over a full cache. Plain-text
    prompts then run to max_new_tokens or the end-of-turn token, and the answer is cut at its
    line as before, so the text scored is the same."""
    from moa_search.calibrate import _eos_ids, _newline_stop, _trim, uses_chat
    from moa_search.hf_adapter import runtime_of

    plain = not uses_chat(tok, chat)
    eos = _eos_ids(model, tok)
    ids, att = _left_pad(prompts, pad, input_device(model))
    if compressed is None:
        compressed = runtime_of(model) is not None and ids.is_cuda
    if compressed:
        from moa_search.generation import generate

        # compile=False: every batch size and plan would compile anew (tens of seconds), more than
        # the few dozen tokens of an answer save
        gen = generate(model, ids, att, max_new_tokens=max_new_tokens, loop="graph" if ids.is_cuda else "static",
                       compile=False, pad_token_id=pad, eos_token_id=sorted(eos) or None)
    else:
        stop = [_newline_stop(tok, ids.shape[1])] if plain else []
        gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=sorted(eos) or None, temperature=None, top_p=None,
                             top_k=None, stopping_criteria=stop)
    return [tok.decode(_trim(gen[b, ids.shape[1]:].tolist(), tok, eos | {pad}, plain), skip_special_tokens=True)
            for b in range(len(prompts))]


def evaluate_items(model, tok, items: list[dict], metrics=METRICS, batch_size: int = 1, mode: str = "generate",
                   progress: bool = True, desc: str = "eval", chat: bool | None = None,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Score items (batched by similar prompt length). Returns one row per item:
    the item's id/task/length/depth plus correct, loss, answer, n_prompt, n_answer."""
    from tqdm.auto import tqdm

    rows: list[dict | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    docs = [i for i, it in enumerate(items) if "input_ids" in it]   # doc_ppl items: fixed tokens
    for i in docs:
        it = items[i]
        rows[i] = {"id": it["id"], "task": it["task"], "length": int(it["length"]), "depth": float("nan"),
                   **score_document(model, it)}
        bar.update(1)
    order = sorted((i for i in range(len(items)) if "input_ids" not in items[i]), key=lambda i: len(items[i]["prompt"]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        scored = score_batch(model, tok, [items[i] for i in idx], metrics, mode, chat, max_new_tokens)
        for i, res in zip(idx, scored):
            it = items[i]
            rows[i] = {"id": it.get("id", str(i)), "task": it.get("task", "unknown"), "length": int(it["length"]),
                       "depth": float(it.get("depth", float("nan"))), **res}
        bar.update(len(idx))
    bar.close()
    return rows  # type: ignore[return-value]


# ----------------------------------------------------------------------------- configurations


@dataclass
class Config:
    """One thing to evaluate: dense (plan None), a plan file, or a uniform density."""

    name: str
    plan: object | None = None           # a Plan, or None
    uniform_density: float | None = None
    sink: int = 64

    def plan_at(self, shape, n: int):
        """The plan to run at length n (uniform: a fixed window giving KV density D at n)."""
        if self.uniform_density is None:
            return self.plan
        from moa_search.plan import PlanError, uniform_plan

        window = int(round(self.uniform_density * n)) - self.sink
        if window < 1:
            raise PlanError(f"uniform density {self.uniform_density} at length {n} leaves no window after "
                            f"{self.sink} sink tokens; lower --sink or raise the density")
        p = uniform_plan(shape, sink=self.sink, span_tokens=window)
        p.budget = {"kind": "kv", "density": float(self.uniform_density), "lengths": [n]}
        return p


def densities(plan, n: int) -> dict:
    if plan is None:
        return {"kv_density": 1.0, "compute_density": 1.0}
    d = plan.densities(n)
    return {"kv_density": d["kv_density"], "compute_density": d["compute_density"]}


def build_configs(dense: bool, plans: list[str], uniform: list[float], sink: int) -> list[Config]:
    from moa_search.plan import load_plan
    from moa_search.rules import check_density

    configs = [Config("dense")] if dense else []
    stems = [Path(p).stem for p in plans]
    for path, stem in zip(plans, stems):
        name = stem if stems.count(stem) == 1 and stem != "plan" else f"{Path(path).parent.name}/{stem}"
        configs.append(Config(name, plan=load_plan(path)))
    for d in uniform:
        check_density(d, "--uniform-density")
        configs.append(Config(f"uniform@{d:g}", uniform_density=d, sink=sink))
    if not configs:
        raise ValueError("nothing to evaluate: give --dense, --plan PLAN and/or --uniform-density D")
    return configs


def _model_signature(model) -> dict:
    """The model a result came from: its path, config and a checksum of two weight tensors (a
    checkpoint trained again in the same folder is another model)."""
    params = list(model.parameters())
    weights = [float(t.detach().float().abs().sum()) for t in (params[0], params[-1]) if t.device.type != "meta"]
    return {"model": getattr(model.config, "_name_or_path", ""), "config": model.config.to_json_string(),
            "weights": weights}


def _progress_key(model_sig: dict, cfg: Config, plan, items: list[dict], metrics, mode: str, chat,
                  max_new_tokens: int, backend: str) -> str:
    """What a (config, length) result depends on: the model, the items, the settings, the plan."""
    import hashlib

    what = {**model_sig,
            "items": [[it.get("id"), it.get("task"), it["length"], it.get("prompt"), it.get("reference"),
                       it.get("input_ids")] for it in items],
            "metrics": list(metrics), "mode": mode, "chat": chat, "max_new_tokens": max_new_tokens,
            "backend": backend, "name": cfg.name,
            # the plan's rules, not its provenance: that holds when it was made, and a uniform plan
            # is made anew by every run (with it, a resumed run scored the uniform config again)
            "plan": None if plan is None else {k: v for k, v in plan.to_dict().items() if k != "provenance"}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _read_progress(path: Path | None) -> dict[str, list[dict]]:
    """key -> rows of the (config, length) results a run already finished (a line cut short by a
    crash is skipped: it is scored again)."""
    done = {}
    if path is None or not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            done[rec["key"]] = rec["rows"]
        except (ValueError, KeyError, TypeError):
            continue
    return done


def run_configs(model, tok, configs: list[Config], items: list[dict], metrics=METRICS, batch_size: int = 1,
                mode: str = "generate", backend: str = "auto", progress: bool = True, chat: bool | None = None,
                max_new_tokens: int = MAX_NEW_TOKENS, resume: Path | None = None) -> list[dict]:
    """Every config on every item; item rows gain 'config', 'kv_density', 'compute_density'.

    resume: a JSONL file; each finished (config, length) appends its rows there, and results
    already in it for the same model, items, settings and plan are taken instead of scored."""
    from moa_search.apply import apply_plan, remove_plan
    from moa_search.plan import ModelShape

    shape = ModelShape.from_config(model.config)
    lengths = sorted({int(it["length"]) for it in items})
    done = _read_progress(resume)
    model_sig = _model_signature(model) if resume else {}
    rows = []
    for cfg in configs:
        for n in lengths:
            plan = cfg.plan_at(shape, n)
            sel = [it for it in items if int(it["length"]) == n]
            key = _progress_key(model_sig, cfg, plan, sel, metrics, mode, chat, max_new_tokens, backend) if resume else ""
            if key in done:
                rows.extend(done[key])
                continue
            if plan is None:
                if getattr(model, "moa_plan", None) is not None:
                    remove_plan(model)
            else:
                apply_plan(model, plan, backend=backend)
            t0 = time.time()
            got = evaluate_items(model, tok, sel, metrics, batch_size, mode, progress, desc=f"{cfg.name} @ {n}",
                                 chat=chat, max_new_tokens=max_new_tokens)
            dens = densities(plan, n)
            for r in got:
                r.update(config=cfg.name, **dens, seconds=(time.time() - t0) / max(1, len(got)))
            rows.extend(got)
            if resume is not None:
                resume.parent.mkdir(parents=True, exist_ok=True)
                line = json.dumps({"key": key, "config": cfg.name, "length": n, "rows": got}) + "\n"
                with open(resume, "a+b") as f:   # one line per result: a crash loses at most the one running
                    f.seek(0, 2)
                    if f.tell() > 0:
                        f.seek(-1, 2)
                        if f.read(1) != b"\n":
                            line = "\n" + line  # the last run died mid-line: start a fresh one
                    f.write(line.encode())
    if getattr(model, "moa_plan", None) is not None:
        remove_plan(model)
    return rows


# ----------------------------------------------------------------------------- aggregation


def depth_bin(depth: float, bins: int) -> int:
    if not math.isfinite(depth):
        return -1
    return min(bins - 1, int(depth * bins))


DENSE_FLOOR = 0.1   # dense accuracy below this at a length: the task is beyond the model there


def beyond_model(rows: list[dict], floor: float = DENSE_FLOOR) -> dict[tuple[int, str], float]:
    """{(length, task): dense accuracy} where the dense model answers under `floor` of the items
    (empty without a dense config: nothing to judge by)."""
    cells: dict[tuple[int, str], list[bool]] = {}
    for r in rows:
        if r["config"] == "dense" and r["correct"] is not None:
            cells.setdefault((int(r["length"]), r["task"]), []).append(bool(r["correct"]))
    return {k: float(np.mean(v)) for k, v in cells.items() if np.mean(v) < floor}


def aggregate(rows: list[dict], bins: int = 5, floor: float = DENSE_FLOOR) -> list[dict]:
    """Long table: config x length x task ('all' too) x depth bin ('all' too).

    task 'headline': the items of the tasks dense answers at that length (beyond_model left
    out), the accuracy to judge a plan by; absent at a length where dense fails every task."""
    beyond = beyond_model(rows, floor)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["task"] == "doc_ppl":   # a perplexity of its own kind: not mixed into the answers' tables
            tasks = ("doc_ppl",)
        else:
            tasks = ("all", r["task"]) + (() if (int(r["length"]), r["task"]) in beyond else ("headline",))
        for task in tasks:
            for d in ("all", depth_bin(r["depth"], bins)):
                groups.setdefault((r["config"], r["length"], task, d), []).append(r)
    out = []
    for (cfg, n, task, d), rs in groups.items():
        acc = [r["correct"] for r in rs if r["correct"] is not None]
        losses = [r["loss"] for r in rs if math.isfinite(r["loss"])]
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        out.append({
            "config": cfg, "length": n, "task": task,
            "depth_bin": d if d == "all" else (f"{d / bins:.1f}-{(d + 1) / bins:.1f}" if d >= 0 else "n/a"),
            "n": len(rs), "prompt_tokens": float(np.mean([r["n_prompt"] for r in rs])),
            "accuracy": float(np.mean(acc)) if acc else float("nan"),
            "loss": mean_loss, "ppl": math.exp(mean_loss) if math.isfinite(mean_loss) else float("nan"),
            "kv_density": rs[0]["kv_density"], "compute_density": rs[0]["compute_density"],
        })
    order = {c: i for i, c in enumerate(dict.fromkeys(r["config"] for r in rows))}
    rank = {"all": 0, "headline": 1}
    out.sort(key=lambda r: (order[r["config"]], r["length"], rank.get(r["task"], 2), r["task"], str(r["depth_bin"])))
    for r in out:
        r["beyond_model"] = (r["length"], r["task"]) in beyond
    return out


def overall(table: list[dict], task: str = "all") -> list[dict]:
    return [r for r in table if r["task"] == task and r["depth_bin"] == "all"]


def beyond_model_notes(table: list[dict]) -> list[str]:
    """One line per (length, task) dense fails at, for the output and summary.json."""
    return [f"{r['task']} at {r['length']}: dense accuracy {r['accuracy']:.2f} < {DENSE_FLOOR} over {r['n']} items; "
            "the task is beyond the model at this length (left out of the headline)"
            for r in table if r["config"] == "dense" and r["beyond_model"] and r["depth_bin"] == "all"]


def _write_csv(path: Path, rows: list[dict]) -> None:
    import io

    from moa_search.files import atomic_write_text

    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def print_tables(table: list[dict], metrics=METRICS, console=None, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    main = overall(table)
    configs = list(dict.fromkeys(r["config"] for r in table))
    lengths = sorted({r["length"] for r in table})

    def grid(label: str, rows: list[dict], metric: str, fmt: str, missing: str = "-") -> None:
        cell = {(r["config"], r["length"]): r for r in rows}
        t = Table(title=f"{title}{label}")
        t.add_column("config")
        for n in lengths:
            items = min((cell[(c, n)]["n"] for c in configs if (c, n) in cell), default=0)
            t.add_column(f"{n}\n{items} items" if items else str(n), justify="right")
        for c in configs:
            vals = []
            for n in lengths:
                r = cell.get((c, n))
                if r is None:
                    vals.append(missing)
                    continue
                kv = "" if c == "dense" else f" [dim](kv {r['kv_density']:.2f})[/]"
                vals.append(fmt.format(r[metric]) + kv)
            t.add_row(c, *vals)
        con.print(t)
    least = min((r["n"] for r in main), default=0)
    if least < 20:   # one item is 5+ accuracy points: say so rather than let a reader compare noise
        con.print(f"[yellow]note: {least} item(s) per cell; differences of one item ({100 / max(least, 1):.0f} "
                  "accuracy points) are noise at this size (more: --per-length)[/]")

    if "retrieval" in metrics:
        beyond = [r for r in table if r["config"] == "dense" and r["beyond_model"] and r["depth_bin"] == "all"]
        grid("retrieval accuracy, headline (the tasks dense answers at that length)", overall(table, "headline"),
             "accuracy", "{:.3f}", missing="beyond the model")
        per_task = Table(title=f"{title}retrieval accuracy per task (* dense < {DENSE_FLOOR}: beyond the model)")
        per_task.add_column("config")
        per_task.add_column("task")
        for n in lengths:
            per_task.add_column(str(n), justify="right")
        tasks = sorted({r["task"] for r in table if r["task"] not in ("all", "headline")})
        cell = {(r["config"], r["task"], r["length"]): r for r in table if r["depth_bin"] == "all"}
        for c in configs:
            for task in tasks:
                vals = []
                for n in lengths:
                    r = cell.get((c, task, n))
                    vals.append("-" if r is None else f"{r['accuracy']:.3f}" + (" *" if r["beyond_model"] else ""))
                per_task.add_row(c, task, *vals)
        con.print(per_task)
        for r in beyond:
            con.print(f"[yellow]warning:[/] dense accuracy on {r['task']} at {r['length']} is {r['accuracy']:.2f} "
                      f"({r['n']} items): the task is beyond the model at this length; it is left out of the headline")
    if "ppl" in metrics:
        grid("answer perplexity (response-masked)", main, "ppl", "{:.3f}")
    if "doc_ppl" in metrics:
        grid("long-document perplexity (Python stdlib source, loss on the second half)",
             overall(table, "doc_ppl"), "ppl", "{:.3f}")


def plot(table: list[dict], out: Path, metrics=METRICS) -> list[Path]:
    """accuracy_vs_length.png, ppl_vs_length.png, depth_heatmaps.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    main = overall(table)
    head = {(r["config"], r["length"]): r for r in overall(table, "headline")}
    configs = list(dict.fromkeys(r["config"] for r in main))
    lengths = sorted({r["length"] for r in main})
    for metric, fname, ylabel in (("accuracy", "accuracy_vs_length.png", "retrieval accuracy"),
                                  ("ppl", "ppl_vs_length.png", "answer perplexity")):
        if (metric == "accuracy" and "retrieval" not in metrics) or (metric == "ppl" and "ppl" not in metrics):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in configs:
            # accuracy: the headline (tasks beyond the model at a length left out); ppl: every item
            pts = sorted((r["length"], head[(c, r["length"])][metric] if metric == "accuracy" else r[metric])
                         for r in main if r["config"] == c and (metric != "accuracy" or (c, r["length"]) in head))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel(ylabel)
        if metric == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
    if "retrieval" in metrics:
        # the headline's items (tasks beyond the model left out); every item when dense fails them all
        which = "headline" if any(r["task"] == "headline" for r in table) else "all"
        bins = sorted({r["depth_bin"] for r in table if r["task"] == which and r["depth_bin"] not in ("all", "n/a")})
        if bins:
            fig, axes = plt.subplots(1, len(configs), figsize=(3.2 * len(configs) + 1.5, 3.4), squeeze=False)
            cell = {(r["config"], r["length"], r["depth_bin"]): r["accuracy"]
                    for r in table if r["task"] == which and r["depth_bin"] != "all"}
            for ax, c in zip(axes[0], configs):
                grid = np.array([[cell.get((c, n, b), np.nan) for n in lengths] for b in bins])
                im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
                ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
                ax.set_yticks(range(len(bins)), bins if ax is axes[0][0] else [""] * len(bins))
                ax.set_title(c, fontsize=9)
                ax.set_xlabel("length")
                for i in range(len(bins)):
                    for j in range(len(lengths)):
                        if np.isfinite(grid[i, j]):
                            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                    color="white" if grid[i, j] < 0.5 else "black")
            axes[0][0].set_ylabel(f"depth of the needed fact ({which} tasks)")
            fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
            fig.savefig(out / "depth_heatmaps.png", dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(out / "depth_heatmaps.png")
    return written


def write_outputs(out: Path, rows: list[dict], table: list[dict], meta: dict, metrics=METRICS,
                  plots: bool = True) -> None:
    from moa_search.files import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "results.csv", table)
    _write_csv(out / "items.csv", rows)
    summary = {**meta, "results": overall(table), "headline": overall(table, "headline"),
               "beyond_model": beyond_model_notes(table)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    if plots:
        plot(table, out, metrics)


# ----------------------------------------------------------------------------- CLI


def parse_metrics(text: str) -> tuple[str, ...]:
    got = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in got if x not in METRICS]
    if bad or not got:
        raise ValueError(f"--tasks takes a comma list of {', '.join(METRICS)}, got {text!r}")
    return got


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moa_search.models import add_device_map_argument

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="Hugging Face checkpoint directory or .gguf file (default: the embedded demo model)")
    p.add_argument("--plan", action="append", default=[], metavar="PLAN", help="plan JSON to evaluate (repeatable)")
    p.add_argument("--dense", action="store_true", help="evaluate the dense model too")
    p.add_argument("--uniform-density", type=float, action="append", default=[], metavar="D",
                   help="evaluate the uniform StreamingLLM plan of KV density D at every length (repeatable)")
    p.add_argument("--sink", type=int, default=64, help="sink tokens of the uniform plans (default 64)")
    p.add_argument("--tasks", default="retrieval,ppl",
                   help="metrics: retrieval, ppl, doc_ppl (comma list; default retrieval,ppl)")
    p.add_argument("--lengths", default="2048,4096,8192", help="comma-separated lengths (default 2048,4096,8192)")
    p.add_argument("--data", default=None, help="eval items: JSONL/JSON file or saved dataset "
                   "(default: the default eval recipe built at --lengths with the model's tokenizer)")
    p.add_argument("--task-types", default=None, help="only these item tasks, e.g. kv_retrieval,passkey")
    p.add_argument("--per-length", type=int, default=None,
                   help="items per task and length (default: 5 built; with --data, all it has)")
    p.add_argument("--retrieval-mode", choices=["generate", "forced"], default="generate",
                   help="generate: greedy generation (default); forced: one teacher-forced pass (faster)")
    p.add_argument("--batch-size", type=int, default=None, help="items per batch (default 8 on GPU, 1 on CPU)")
    p.add_argument("--depth-bins", type=int, default=5, help="depth bins of the heatmaps (default 5)")
    p.add_argument("--seed", type=int, default=None, help="seed of the built items (default: the eval recipe's, 1)")
    p.add_argument("--device", default=None, help="cuda, cpu... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu_window"],
                   help="sparse attention backend for plans (auto: Triton on GPU; on CPU cpu_window, which "
                        "gathers only the kept keys; reference: the all-pairs oracle)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                   help=f"longest generated answer (default {MAX_NEW_TOKENS}); built prompts leave this room "
                        "within each length")
    p.add_argument("--no-chat-template", action="store_true",
                   help="plain-text prompts even when the tokenizer has a chat template (to compare; default: "
                        "the template, with the answer cue opening the assistant turn)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--restart", action="store_true",
                   help=f"score everything again (default: a run cut short resumes from -o DIR/{PROGRESS}, "
                        "taking the results of configs and lengths it finished with the same model, items and "
                        "settings)")
    add_device_map_argument(p)
    from moa_search.models import add_gguf_argument

    add_gguf_argument(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")


def evaluate(model_dir, configs: list[Config], lengths: list[int], out: Path, metrics=DEFAULT_METRICS, data=None,
             per_length=None, mode="generate", batch_size=None, device=None, dtype=None, backend="auto",
             bins=5, seed=None, task_types=None, plots=True, console=None, title="", device_map=None,
             gguf_file=None, chat: bool | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
             restart: bool = False) -> list[dict]:
    """Load the model, score every config, write the outputs; returns the aggregated table.

    chat: None uses the tokenizer's chat template when it has one, False never.
    A run cut short resumes from out/progress.jsonl (restart: start over)."""
    from moa_search.models import load_model

    if device_map is not None:
        gpu = torch.cuda.is_available()
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = device.startswith("cuda")
    dtype = dtype or ("bfloat16" if gpu else "float32")
    from moa_search.calibrate import uses_chat

    model, tok = load_model(str(model_dir), device, dtype, device_map, gguf_file=gguf_file)
    room = max_new_tokens if "retrieval" in metrics and mode == "generate" else 16   # forced/ppl: the reference
    items = eval_items(tok, lengths, per_length, data, seed, task_types, chat, room) \
        if {"retrieval", "ppl"} & set(metrics) else []
    qa = list(items)
    if "doc_ppl" in metrics:
        items += doc_items(tok, lengths, per_length or 2, seed or 0)
    warnings = [w for c in configs if c.plan is not None for w in sink_share_warnings(c.plan, c.name)]
    for w in warnings:
        print(f"moa eval: warning: {w}", file=sys.stderr)
    bs = batch_size or (8 if gpu else 1)
    t0 = time.time()
    progress = out / PROGRESS
    if restart and progress.exists():
        progress.unlink()
    rows = run_configs(model, tok, configs, items, metrics, bs, mode, backend, chat=chat,
                       max_new_tokens=max_new_tokens, resume=progress)
    table = aggregate(rows, bins)
    meta = {"model": str(model_dir), "configs": [c.name for c in configs], "lengths": lengths,
            "metrics": list(metrics), "retrieval_mode": mode, "items": len(items), "data": data or "default eval set",
            "chat_template": uses_chat(tok, chat), "max_new_tokens": max_new_tokens,
            "prompt_tokens_max": {str(n): max((len(_tokenize(tok, it["prompt"], it["reference"], chat)[0])
                                               for it in qa if int(it["length"]) == n), default=0)
                                  for n in lengths},
            "warnings": warnings, "device": device, "dtype": dtype, "seconds": round(time.time() - t0, 1)}
    write_outputs(out, rows, table, meta, metrics, plots)
    print_tables(table, metrics, console, title)
    return table


def run(args) -> int:
    from moa_search.models import parse_device_map

    from moa_search.errors import check_counts
    from moa_search.rules import lengths_arg

    try:
        metrics = parse_metrics(args.tasks)
        lengths = lengths_arg("--lengths", args.lengths)
        check_counts(("--per-length", args.per_length), ("--batch-size", args.batch_size),
                     ("--depth-bins", args.depth_bins))
        if args.sink < 0:
            raise ValueError(f"--sink must be >= 0, got {args.sink}")
        configs = build_configs(args.dense, args.plan, args.uniform_density, args.sink)
        if args.data is not None and not read_items(args.data):   # a broken file fails before the model loads
            raise ValueError(f"{args.data}: no items (the file is empty)")
        if args.model is not None:
            from moa_search.models import check_model

            check_model(args.model, getattr(args, "gguf_file", None))
    except ValueError as e:
        print(f"moa eval: error: {e}", file=sys.stderr)
        return 2
    model_dir = args.model
    if model_dir is None:
        from moa_search.models import embedded_model_dir

        model_dir = embedded_model_dir()
    task_types = [t.strip() for t in args.task_types.split(",")] if args.task_types else None
    try:
        evaluate(model_dir, configs, lengths, Path(args.output), metrics, args.data, args.per_length,
                 args.retrieval_mode, args.batch_size, args.device, args.dtype, args.backend, args.depth_bins,
                 args.seed, task_types, not args.no_plots, device_map=parse_device_map(args.device_map),
                 gguf_file=args.gguf_file, chat=False if args.no_chat_template else None,
                 max_new_tokens=args.max_new_tokens, restart=args.restart)
    except (ValueError, FileNotFoundError) as e:
        print(f"moa eval: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}/results.csv, items.csv, summary.json" + ("" if args.no_plots else " and PNGs"))
    return 0
