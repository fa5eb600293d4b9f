"""`moa calibrate`: a calibration set whose answers the model itself wrote.

MoA's finding (DESIGN.md sections 4 and 9): the profile is only as good as its data. The
prompts need long-range dependencies, and the loss must be taken on the model's *own*
answers, not on gold answers. This step builds the prompts (see
moa_search.calibration_data.sources for --source), lets the dense model answer each one
(greedy, batched with left padding), and saves

    DIR/                 a `datasets.Dataset` (save_to_disk), one row per item:
        id str, task str, length int (target), depth float (-1: n/a), prompt str,
        reference str (gold answer, "" if unknown; for scoring only),
        answer str (the model's greedy answer), input_ids list[int] (prompt + answer tokens,
        the chat template applied when the tokenizer has one, plain text otherwise),
        response_start int, response_end int (half-open span of the answer in input_ids),
        n_tokens int (= len(input_ids))
    DIR/meta.json        model fingerprint, lengths, seeds, source, calibration_hash (content
                         hash of ids, tokens and spans; profiles record it), counts, versions

Length convention. `length` is the target of the whole sequence: prompts are built (or
cut) to `length - max_new_tokens` tokens including the chat template, so the prompt plus
the answer stays within `length` (prompt line granularity may add a few tokens).

Answers. Generation stops at the end-of-sequence token or after --max-new-tokens. For
plain-text models (no chat template) it also stops at the first newline after the answer
has begun, because such a model would otherwise go on writing unrelated text; the loss
should sit on the answer only. Items whose answer comes out empty are dropped and counted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moa_search import distributed
from moa_search.plan import PlanError

FORMAT = "moa-search-calibration"
VERSION = 1
COLUMNS = ("id", "task", "length", "depth", "prompt", "reference", "answer", "input_ids",
           "response_start", "response_end", "n_tokens")


class CalibrationError(PlanError):
    """A calibration source, run or folder is unusable (message says which and why)."""


# ----------------------------------------------------------------------------- tokens


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat(tokenizer, chat: bool | None = None) -> bool:
    """Whether prompts go through the chat template: chat=None means when the tokenizer has
    one; chat=False (--no-chat-template) never."""
    return has_chat_template(tokenizer) if chat is None else bool(chat) and has_chat_template(tokenizer)


def prompt_ids(tokenizer, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids the model sees for a prompt, ending where its answer starts.

    Chat template (see uses_chat): the prompt's last "Answer: <cue>" line
    (tasks.split_answer_cue) leaves the user turn and starts the assistant turn, after the
    template's generation prompt, so a chat model answers on the next tokens as it would
    write them (with the cue inside the user turn it restarts its reply and needs ~20 tokens
    before the answer). Plain text: the prompt as it is, with the tokenizer's usual special
    tokens (e.g. BOS)."""
    from moa_search.calibration_data.tasks import split_answer_cue

    if uses_chat(tokenizer, chat):
        body, cue = split_answer_cue(prompt)
        text = tokenizer.apply_chat_template([{"role": "user", "content": body.rstrip("\n") or body}],
                                             tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if cue:
            ids += tokenizer(cue, add_special_tokens=False).input_ids
        return ids
    return list(tokenizer(prompt).input_ids)


def answer_follows(prompt: str, tokenizer, chat: bool | None = None) -> str:
    """The text the answer comes straight after: the cue (chat with a cue), "" (chat without
    one: the answer opens the assistant turn) or the prompt (plain text)."""
    from moa_search.calibration_data.tasks import split_answer_cue

    if uses_chat(tokenizer, chat):
        return split_answer_cue(prompt)[1] or ""
    return prompt


def text_counter(tokenizer):
    """count_tokens(str) for the builders: tokens of a text, no special tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def prompt_budget(tokenizer, max_new_tokens: int, chat: bool | None = None):
    """budget(L): tokens the prompt text may take so that template + prompt + answer fit L."""
    overhead = len(prompt_ids(tokenizer, "", chat))
    return lambda length: int(length) - overhead - int(max_new_tokens)


def middle_truncator(tokenizer):
    """truncate_middle(text, n): keep the first and last n/2 tokens of a long text."""
    def cut(text: str, n: int) -> str:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= n:
            return text
        sep = "\n...\n"  # marks the cut for a reader; its own tokens come out of the budget
        keep = max(n - len(tokenizer(sep, add_special_tokens=False).input_ids), 2)
        head = keep // 2
        return (tokenizer.decode(ids[:head], skip_special_tokens=True) + sep
                + tokenizer.decode(ids[len(ids) - (keep - head):], skip_special_tokens=True))
    return cut


# ----------------------------------------------------------------------------- answers


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return ids


def _trim(tokens: list[int], tokenizer, eos: set[int], stop_at_newline: bool) -> list[int]:
    """Answer tokens: up to the first EOS; for plain-text models also up to the first
    newline that follows some answer text (the newline token itself is left out)."""
    for k, t in enumerate(tokens):
        if t in eos:
            tokens = tokens[:k]
            break
    if stop_at_newline:
        for k in range(len(tokens)):
            text = tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)
            if "\n" in text.lstrip():
                tokens = tokens[:k]
                break
    return tokens


def _newline_stop(tokenizer, prompt_len: int):
    """A transformers StoppingCriteria: a row is done once its answer text holds a newline
    after some non-blank text (the rule of `_trim`), so plain-text models stop early."""
    import torch
    from transformers import StoppingCriteria

    class AnswerLineEnded(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            rows = input_ids[:, prompt_len:].tolist()
            done = ["\n" in tokenizer.decode(r, skip_special_tokens=True).lstrip() for r in rows]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return AnswerLineEnded()


def _answers_key(prompts: list[list[int]], max_new_tokens: int, batch_size: int, stop_at_newline: bool,
                 run_tag: str) -> str:
    """What a checkpoint of answers belongs to: the prompts' tokens and the answering settings."""
    h = hashlib.sha256(json.dumps([max_new_tokens, batch_size, bool(stop_at_newline), run_tag]).encode())
    for ids in prompts:
        h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def _load_answers(path, key: str) -> dict[int, list[int]]:
    """Answers kept by an interrupted run with the same key ({} when none or another run's)."""
    if path is None or not Path(path).exists():
        return {}
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        saved = {}
    if saved.get("key") != key:
        if distributed.info()[0] == 0:
            print(f"moa calibrate: {path} holds the answers of another run (other prompts, model or settings); "
                  "answering from the start", file=sys.stderr)
        return {}
    answers = {int(i): toks for i, toks in saved["answers"].items()}
    if distributed.info()[0] == 0:
        print(f"moa calibrate: resuming with {len(answers)} answer(s) kept in {path}", file=sys.stderr)
    return answers


def _save_answers(path, key: str, answers: dict[int, list[int]]) -> None:
    from moa_search.files import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "answers": {str(i): t for i, t in sorted(answers.items())}}))


def _encode_prompts(tokenizer, items: list[dict], max_new_tokens: int, max_positions: int | None,
                    chat: bool | None) -> list[list[int]]:
    """Every item's prompt ids (prompt_ids), refusing empty prompts and prompts that leave no
    room for the answer within the model's positions."""
    prompts = []
    for n, it in enumerate(items):
        if not isinstance(it.get("prompt"), str) or not it["prompt"].strip():
            raise CalibrationError(f"item {it.get('id', n)}: empty prompt")
        ids = prompt_ids(tokenizer, it["prompt"], chat)
        if max_positions and len(ids) + max_new_tokens > max_positions:
            raise CalibrationError(
                f"item {it.get('id', n)}: {len(ids)} prompt tokens + {max_new_tokens} answer tokens exceed the "
                f"model's maximum of {max_positions} positions (max_position_embeddings); use shorter --lengths")
        prompts.append(ids)
    return prompts


def _greedy_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                  stop_at_newline: bool) -> list[list[int]]:
    """Greedy continuations of one left-padded batch (untrimmed: EOS/padding still in)."""
    import torch

    from moa_search.apply import input_device

    enc = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    enc = {k: v.to(input_device(model)) for k, v in enc.items()}
    stop = [_newline_stop(tokenizer, enc["input_ids"].shape[1])] if stop_at_newline else []
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=pad_id, stopping_criteria=stop)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def _answer_all(model, tokenizer, prompts, batch_size, max_new_tokens, pad_id, eos, stop_at_newline, progress,
                checkpoint, checkpoint_every, key) -> dict[int, list[int]]:
    """{item index: trimmed answer tokens}, longest prompts first (similar lengths share a batch);
    under torchrun the batches are dealt out to the ranks and gathered; kept in `checkpoint`."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[b: b + batch_size] for b in range(0, len(order), batch_size)]
    rank, world = distributed.info()
    answers = _load_answers(checkpoint, key)
    todo = [idx for idx in batches if not all(i in answers for i in idx)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        bar = tqdm(total=len(prompts), initial=len(prompts) - sum(map(len, todo)), desc="answering", unit="item",
                   disable=not progress or rank != 0)
        chunk = max(1, checkpoint_every) * world
        for c in range(0, len(todo), chunk):
            mine = {}
            for idx in todo[c + rank: c + chunk: world]:
                new = _greedy_batch(model, tokenizer, [prompts[i] for i in idx], max_new_tokens, pad_id,
                                    stop_at_newline)
                for i, toks in zip(idx, new):
                    mine[i] = _trim(toks, tokenizer, eos, stop_at_newline)
                if world == 1:
                    bar.update(len(idx))
            for part in distributed.gather(mine):
                answers.update(part)
            if world > 1:
                bar.update(sum(map(len, todo[c: c + chunk])))
            if checkpoint is not None and rank == 0:
                _save_answers(checkpoint, key, answers)
        bar.close()
    finally:
        tokenizer.padding_side = side
    return answers


def _rows(items: list[dict], prompts: list[list[int]], answers: dict[int, list[int]], tokenizer):
    """Dataset rows (module doc's columns) and the ids of the items whose answer was empty."""
    rows, dropped = [], []
    for n, it in enumerate(items):
        ans = answers[n]
        if not ans:
            dropped.append(str(it.get("id", n)))
            continue
        ids = prompts[n] + ans
        rows.append({
            "id": str(it.get("id", n)), "task": str(it.get("task", "user")),
            "length": int(it.get("length", len(ids))),
            "depth": float(it["depth"]) if it.get("depth") is not None else -1.0,
            "prompt": it["prompt"], "reference": str(it.get("reference") or ""),
            "answer": tokenizer.decode(ans, skip_special_tokens=True),
            "input_ids": ids, "response_start": len(prompts[n]), "response_end": len(ids), "n_tokens": len(ids),
        })
    return rows, dropped


def generate_answers(model, tokenizer, items: list[dict], max_new_tokens: int = 24, batch_size: int = 1,
                     progress: bool = True, stop_at_newline: bool | None = None, max_positions: int | None = None,
                     checkpoint=None, checkpoint_every: int = 4, run_tag: str = "", chat: bool | None = None):
    """The model's greedy answers to items -> a calibration `datasets.Dataset` (see module doc).

    items: dicts with "prompt" and optionally "id", "task", "length", "depth", "reference".
    Batched longest-first with left padding. stop_at_newline: default True when prompts are
    plain text (no chat template, or chat=False). max_positions: refuse prompts + max_new_tokens
    beyond it (default: model.config.max_position_embeddings). Items with an empty answer are
    dropped. chat: see uses_chat / prompt_ids (the answer cue opens the assistant turn).

    Under torchrun the batches are dealt out to the ranks (the same batches as in one
    process, so the answers are the same) and every rank gets all answers back.
    checkpoint: a JSON file that keeps the answers so far, written by rank 0 after every
    `checkpoint_every` batches per rank; a rerun with the same prompts, settings and
    run_tag (e.g. the model's path and dtype) answers only what is missing.
    """
    import datasets

    if not items:
        raise CalibrationError("no calibration items to answer")
    if stop_at_newline is None:
        stop_at_newline = not uses_chat(tokenizer, chat)
    max_positions = max_positions or getattr(model.config, "max_position_embeddings", None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise CalibrationError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    eos = _eos_ids(model, tokenizer) | {pad_id}  # rows that finished early are filled with pad_id

    prompts = _encode_prompts(tokenizer, items, max_new_tokens, max_positions, chat)
    key = _answers_key(prompts, max_new_tokens, batch_size, stop_at_newline, run_tag)
    answers = _answer_all(model, tokenizer, prompts, batch_size, max_new_tokens, pad_id, eos, stop_at_newline,
                          progress, checkpoint, checkpoint_every, key)
    rows, dropped = _rows(items, prompts, answers, tokenizer)
    if dropped and distributed.info()[0] == 0:
        print(f"moa calibrate: dropped {len(dropped)} item(s) whose answer was empty: {', '.join(dropped[:10])}"
              + (" ..." if len(dropped) > 10 else ""), file=sys.stderr)
    if not rows:
        raise CalibrationError("every answer came out empty (the model stopped at once); nothing to calibrate on")
    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------- dataset I/O


def calibration_hash(ds) -> str:
    """Content hash of a calibration set: ids, tokens and response spans, in order."""
    h = hashlib.sha256()
    cols = ["id", "input_ids", "response_start", "response_end"]
    for batch in ds.select_columns(cols).iter(batch_size=256):
        for i, ids, s, e in zip(*(batch[c] for c in cols)):
            h.update(json.dumps([i, int(s), int(e)]).encode())
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def load_calibration(path):
    """A calibration folder written by `moa calibrate` -> datasets.Dataset (validated)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"{path}: no such calibration folder (make one with `moa calibrate ... -o {path}`)")
    if not path.is_dir():
        raise CalibrationError(f"{path}: a calibration set is a folder written by `moa calibrate`, not a file")
    state = path / "state.json"
    if state.exists() and json.loads(state.read_text()).get("_data_files") == []:
        raise CalibrationError(f"{path}: the calibration set is empty")  # datasets cannot even load it
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise CalibrationError(f"{path}: not a saved dataset (no dataset_info.json/state.json); "
                               "make one with `moa calibrate`") from None
    except Exception as e:  # a damaged folder: say so rather than show datasets' internals
        raise CalibrationError(f"{path}: could not be read as a saved dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise CalibrationError(f"{path}: holds a DatasetDict (splits {list(ds)}), expected one Dataset")
    missing = [c for c in ("input_ids", "response_start", "response_end") if c not in ds.column_names]
    if "input_ids" not in missing and missing:
        raise CalibrationError(f"{path}: missing response spans (columns {missing}); the loss needs the answer's "
                               "token span: rebuild the set with `moa calibrate`")
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise CalibrationError(f"{path}: missing column(s) {missing}; expected {list(COLUMNS)}")
    if len(ds) == 0:
        raise CalibrationError(f"{path}: the calibration set is empty")
    s = np.asarray(ds["response_start"]), np.asarray(ds["response_end"]), np.asarray(ds["n_tokens"])
    bad = np.nonzero((s[0] < 1) | (s[1] <= s[0]) | (s[1] > s[2]))[0]
    if len(bad):
        i = int(bad[0])
        raise CalibrationError(f"{path}: item {ds[i]['id']!r} has an invalid response span "
                               f"[{s[0][i]}, {s[1][i]}) for {s[2][i]} tokens")
    return ds


def load_meta(path) -> dict:
    """meta.json of a calibration folder ({} when absent)."""
    p = Path(path) / "meta.json"
    return json.loads(p.read_text()) if p.exists() else {}


def save_calibration(ds, out, meta: dict, overwrite: bool = False) -> Path:
    """Write ds + meta.json to folder `out` atomically (built beside it, then renamed)."""
    from moa_search.files import atomic_write_text, current_umask

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CalibrationError(f"{out}: exists and is not empty; pass --overwrite or another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp makes it private (0700); a plain mkdir would not
    try:
        ds.save_to_disk(str(tmp))
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- the step


def calibrate(model, tokenizer, source: str = "default", lengths: list[int] | None = None,
              per_length: int | None = None, seed: int = 0, max_new_tokens: int = 24, batch_size: int = 1,
              progress: bool = True, model_name: str = "", checkpoint=None, checkpoint_every: int = 4,
              chat: bool | None = None, only_correct: bool = False):
    """Build prompts from `source`, answer them with the model -> (dataset, meta dict).

    checkpoint: file keeping the answers of an unfinished run (see generate_answers).
    chat: None uses the tokenizer's chat template when it has one, False never (prompt_ids).
    only_correct: keep only the items whose answer matches their reference (items without a
    reference are kept), for a model that fails most items at the profiled lengths. Tried on
    SmolLM2-135M, where MoA plans lose retrieval: it did not bring retrieval back (the right
    answers' digits are confident, so their loss gradient is near zero; BENCHMARKS.md, issue 19)."""
    from moa_search.calibration_data import sources, tasks
    from moa_search.plan import ModelShape, provenance

    max_pos = getattr(model.config, "max_position_embeddings", None)
    if lengths and max_pos and max(lengths) > max_pos:
        raise CalibrationError(f"length {max(lengths)} is above the model's maximum of {max_pos} positions "
                               "(max_position_embeddings)")
    budget = prompt_budget(tokenizer, max_new_tokens, chat)
    try:
        prep = sources.prepare(source, lengths, text_counter(tokenizer), budget, per_length=per_length, seed=seed,
                               truncate_middle=middle_truncator(tokenizer))
    except sources.SourceError as e:
        raise CalibrationError(str(e)) from None
    first = distributed.info()[0] == 0
    for reason, n in prep.skipped.items():
        if first:
            print(f"moa calibrate: skipped {n} record(s): {reason}", file=sys.stderr)
    ds = generate_answers(model, tokenizer, prep.items, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          progress=progress, max_positions=max_pos, checkpoint=checkpoint,
                          checkpoint_every=checkpoint_every, run_tag=f"{model_name}|{model.dtype}|chat={chat}",
                          chat=chat)
    dropped_wrong = 0
    if only_correct:
        keep = [k for k, (a, r) in enumerate(zip(ds["answer"], ds["reference"])) if not r or tasks.is_correct(a, r)]
        dropped_wrong = len(ds) - len(keep)
        if not keep:
            raise CalibrationError("--only-correct: the model answered no item right; nothing to calibrate on "
                                   "(shorter --lengths, or more --per-length)")
        ds = ds.select(keep)
    over = [i for i, n, L in zip(ds["id"], ds["n_tokens"], ds["length"]) if n > L]
    if over and first:  # e.g. raw items from a file whose `length` counted the prompt alone
        print(f"moa calibrate: warning: {len(over)} item(s) are longer than their target length "
              f"(e.g. {over[0]}); `moa profile` uses only samples of at most `length` tokens", file=sys.stderr)
    shape = ModelShape.from_config(model.config)
    by_length = {}
    for length, n, ok in zip(ds["length"], ds["n_tokens"], (tasks.is_correct(a, r) if r else None
                                                            for a, r in zip(ds["answer"], ds["reference"]))):
        d = by_length.setdefault(str(length), {"items": 0, "min_tokens": n, "max_tokens": n, "correct": 0, "scored": 0})
        d["items"] += 1
        d["min_tokens"], d["max_tokens"] = min(d["min_tokens"], n), max(d["max_tokens"], n)
        if ok is not None:
            d["scored"] += 1
            d["correct"] += int(ok)
    meta = {
        "format": FORMAT, "version": VERSION,
        "model": {"path": model_name, **asdict(shape)},
        "fingerprint": shape.fingerprint,
        "lengths": sorted({int(n) for n in ds["length"]}),
        "seeds": prep.seeds, "source": prep.description, "items": len(ds), "by_length": by_length,
        "skipped": prep.skipped, "over_length": len(over), "chat_template": uses_chat(tokenizer, chat),
        "max_new_tokens": max_new_tokens, "only_correct": only_correct, "dropped_wrong": dropped_wrong,
        "calibration_hash": calibration_hash(ds),
        **provenance(),
    }
    return ds, meta


def add_arguments(p) -> None:
    import argparse

    from moa_search.calibration_data import sources
    from moa_search.models import add_device_map_argument, add_gguf_argument

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Build calibration prompts with long-range dependencies, let the dense model answer them\n"
        "(greedy), and save a `datasets` folder with the token ids and the answer span of every\n"
        "item; `moa profile` takes its loss on those answer tokens only.\n\n"
        "examples:\n"
        "  moa calibrate --model MODEL_DIR -o cal/                      # default set, 1k/2k/4k\n"
        "  moa calibrate --model MODEL_DIR --source synthetic:kv_retrieval,passkey,var_tracking \\\n"
        "      --lengths 2048,4096,8192 --per-length 8 --batch-size 4 -o cal/\n"
        "  moa calibrate --model MODEL_DIR --source my_docs.jsonl --lengths 8k -o cal/\n"
        "  torchrun --nproc-per-node 4 -m moa_search.cli calibrate --model MODEL_DIR -o cal/   # 4 GPUs\n\n"
        "An interrupted run keeps its answers in .DIR.answers.json beside DIR; the same command\n"
        "again answers only the rest. Under torchrun each rank answers every K-th batch and\n"
        "rank 0 writes the folder (the same set as one process).\n\n"
        + sources.__doc__)
    p.epilog = ("Output: DIR (datasets.load_from_disk; columns id, task, length, depth, prompt, reference, "
                "answer, input_ids, response_start, response_end, n_tokens) and DIR/meta.json.")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="Hugging Face checkpoint directory or a .gguf file")
    add_gguf_argument(p)
    p.add_argument("--source", default="default",
                   help="'default' (the default), 'synthetic:kv_retrieval,passkey,var_tracking', or a "
                        "json/jsonl/parquet file, folder, or saved dataset (schema above)")
    p.add_argument("--lengths", default=None,
                   help="comma-separated target lengths in tokens, e.g. 2048,4096,8192 or 8k "
                        "(default source: 1024,2048,4096; user data: each record as it is)")
    p.add_argument("--per-length", type=int, default=None,
                   help="synthetic items per task and length, at evenly spread depths (default 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic: builders (default 0; the default set keeps its recorded seed)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="give the model plain-text prompts even when its tokenizer has a chat template "
                        "(default: the template, with the answer cue opening the assistant turn)")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="longest answer (default 24); prompts leave this much room within each length")
    p.add_argument("--batch-size", type=int, default=1, help="prompts answered together (default 1)")
    p.add_argument("--only-correct", action="store_true",
                   help="keep only items the model answered right (default: every answer, right or wrong, "
                        "as MoA does); for a model that fails most items at the profiled lengths")
    p.add_argument("--device", default=None, help="cuda, cpu... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    add_device_map_argument(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--checkpoint-every", type=int, default=4, metavar="K",
                   help="keep the answers so far after every K batches per rank (default 4)")
    p.add_argument("--restart", action="store_true",
                   help="discard the answers an interrupted run kept (.DIR.answers.json beside DIR)")


def run(args) -> int:
    from moa_search.models import load_model, parse_device_map
    from moa_search.errors import check_counts
    from moa_search.rules import lengths_arg

    lengths = lengths_arg("--lengths", args.lengths) if args.lengths else None
    check_counts(("--per-length", args.per_length), ("--max-new-tokens", args.max_new_tokens),
                 ("--batch-size", args.batch_size), ("--checkpoint-every", args.checkpoint_every))
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CalibrationError(f"{out}: exists and is not empty; pass --overwrite or another -o")
    from moa_search.calibration_data import sources
    from moa_search.models import check_model

    check_model(args.model, getattr(args, "gguf_file", None))   # before torch loads: a wrong folder or source fails in a second
    sources.check_source(args.source)
    ckpt = answers_checkpoint(out)
    if args.restart:
        ckpt.unlink(missing_ok=True)
    started = distributed.init()
    try:
        model, tok = load_model(args.model, args.device, args.dtype, parse_device_map(args.device_map),
                                gguf_file=args.gguf_file)
        ds, meta = calibrate(model, tok, args.source, lengths, args.per_length, args.seed, args.max_new_tokens,
                             args.batch_size, model_name=str(args.model), checkpoint=ckpt,
                             checkpoint_every=args.checkpoint_every, chat=False if args.no_chat_template else None,
                             only_correct=args.only_correct)
        meta["world_size"] = distributed.info()[1]
        if distributed.info()[0] == 0:
            save_calibration(ds, out, meta, overwrite=args.overwrite)
            ckpt.unlink(missing_ok=True)
            print(f"wrote {out}: {len(ds)} items, hash {meta['calibration_hash']}")
            print(answers_report(meta))
        distributed.barrier()
    finally:
        distributed.close(started)
    return 0


def answers_report(meta: dict) -> str:
    """Per length: items, token range, and how many of the model's own answers match the
    reference. MoA profiles on those answers, right or wrong (DESIGN.md section 4: the loss
    on what the model itself would write), so a low count is not an error; it says how far
    the model reaches at that length."""
    lines = []
    for length, d in meta["by_length"].items():
        acc = f", the model's answer matches the reference on {d['correct']}/{d['scored']}" if d["scored"] else ""
        lines.append(f"  length {length}: {d['items']} items, {d['min_tokens']}-{d['max_tokens']} tokens{acc}")
    if meta.get("only_correct"):
        lines.append(f"  (--only-correct: {meta.get('dropped_wrong', 0)} wrong answer(s) left out; the counts above "
                     "are of the items kept)")
    elif any(d["scored"] for d in meta["by_length"].values()):
        lines.append("  (the profile is taken on the model's own answers, right or wrong; "
                     f"prompts {'through the chat template' if meta.get('chat_template') else 'as plain text'})")
    return "\n".join(lines)


def answers_checkpoint(out) -> Path:
    """Where an unfinished `moa calibrate -o out` keeps its answers: a hidden file beside out."""
    out = Path(out)
    return out.parent / f".{out.name}.answers.json"


__all__ = ["CalibrationError", "COLUMNS", "prompt_ids", "generate_answers", "calibration_hash", "load_calibration",
           "load_meta", "save_calibration", "calibrate", "answers_checkpoint", "add_arguments", "run"]
