"""Where calibration prompts come from: built-in synthetic tasks, the default set, or user data.

Source strings (`moa calibrate --source ...`):

    default                           the default calibration recipe (calibration_data/defaults.py:
                                      kv_retrieval, passkey, var_tracking, 4 items per length at
                                      evenly spread depths, seed 0), built at the requested
                                      lengths with the model's own tokenizer
    synthetic:kv_retrieval,passkey    the named tasks (tasks.TASKS), --per-length items per length
    FILE or DIR                       the user's own data, read through `datasets`

User data. A local .json / .jsonl / .parquet file, a folder of such files, or a dataset
saved with `Dataset.save_to_disk` (a DatasetDict must have exactly one split, or a
"train" split). One record per prompt; fields:

    prompt     str   a complete prompt, used as-is (never cut)               } one of
    context    str   a long document; cut in the middle to fit each length   } the two
    question   str   optional; appended after the context ("\\n\\n" between) and never cut
    id         str   optional; default "<file stem>-<row>"
    reference  str   optional gold answer (alias: "answer"), kept for scoring only: the
                     calibration answers are always the model's own
    task, depth, length   optional; kept (length: a prompt's target length, see below)

Lengths. A "context" record yields one item per requested length L that it can fill:
its context is cut in the middle (start and end kept) so the whole prompt takes L tokens
minus the room reserved for the answer; records too short for L are skipped for that L
and counted. A "prompt" record yields one item; its length is its own "length" field, else
the smallest requested L that holds it, else its token count plus the template and answer
room (as for "context" records when no lengths are given). Items of a file that carry
a "length" field (such as calibration_data/default_eval.jsonl) are filtered to the
requested lengths.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from moa_search.calibration_data import defaults, tasks
from moa_search.errors import MoaError


class SourceError(MoaError):
    """A calibration source is missing, unreadable, empty or malformed."""


@dataclass
class Prepared:
    """Items ready for the model: each {"id", "task", "length", "depth", "prompt", "reference"}."""

    items: list[dict]
    description: str
    seeds: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # reason -> count


# A callable that turns a prompt-text token budget into the text budget for one length:
# budget(L) = tokens the prompt text may take so that template + prompt + answer fit L.
Budget = Callable[[int], int]


def prepare(source: str, lengths: list[int] | None, count_tokens: tasks.CountTokens, budget: Budget,
            per_length: int | None = None, seed: int = 0,
            truncate_middle: Callable[[str, int], str] | None = None) -> Prepared:
    """Resolve a source string to items (see the module docstring).

    count_tokens: tokens of a text under the model's tokenizer (no special tokens).
    budget(L): tokens the prompt text may take for target length L.
    truncate_middle(text, n): text cut in the middle to n tokens (user "context" records).
    """
    source = source.strip()
    if source == "default":
        r = defaults.RECIPES["calibration"]
        lengths = lengths or [n for g in r["groups"] for n in g["lengths"]]
        k = per_length or r["groups"][0]["per_length"]
        items = _synthetic(r["tasks"], lengths, k, r["seed"], count_tokens, budget)
        return Prepared(items,
                        f"default calibration recipe ({', '.join(r['tasks'])}; {k} per length; seed {r['seed']})",
                        {"builder": r["seed"]})
    if source.startswith("synthetic:") or source == "synthetic":
        names = [t.strip() for t in source.partition(":")[2].split(",") if t.strip()] or list(tasks.TASKS)
        unknown = [t for t in names if t not in tasks.TASKS]
        if unknown:
            raise SourceError(f"--source {source}: unknown task(s) {unknown}; known: {', '.join(tasks.TASKS)}")
        if not lengths:
            raise SourceError(f"--source {source}: give --lengths (e.g. 2048,4096,8192)")
        per_length = per_length or 4
        items = _synthetic(names, lengths, per_length, seed, count_tokens, budget)
        return Prepared(items, f"synthetic tasks {', '.join(names)}; {per_length} per length; seed {seed}",
                        {"builder": seed})
    return _user(source, lengths, count_tokens, budget, truncate_middle)


def _synthetic(names, lengths, per_length, seed, count_tokens, budget) -> list[dict]:
    items = []
    for task in names:
        for length in lengths:
            n = budget(length)
            for k, depth in enumerate(tasks.depths_for(per_length)):
                # the same per-item seeding as tasks.build_items: ids and items are stable
                rng = random.Random(f"{seed}-{task}-{length}-{k}")
                try:
                    it = tasks.make_item(task, rng, n, count_tokens, depth)
                except ValueError as e:
                    raise SourceError(f"length {length} is too short for task {task!r} with this tokenizer "
                                      f"and answer room ({n} prompt tokens): {e}") from None
                items.append({"id": f"{task}-{length}-{k}", "task": task, "length": int(length),
                              "depth": it["depth"], "prompt": it["prompt"], "reference": it["reference"]})
    return items


# ----------------------------------------------------------------------------- user data

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON Lines file, one object a line (blank lines skipped); errors name the line."""
    import json

    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise SourceError(f"{path}, line {n}: expected a JSON object {{\"prompt\": ...}} or "
                                      f"{{\"context\": ...}}, got a {type(row).__name__}")
                rows.append(row)
        except UnicodeDecodeError:
            raise SourceError(f"{path}: not UTF-8 text (a JSON Lines file is text, one JSON object a line)") from None
    if not rows:
        raise SourceError(f"{path}: no records (the file is empty; expected one JSON object a line)")
    return rows


def _blank(path: Path) -> bool:
    """An empty or whitespace-only file (read only when small)."""
    return path.stat().st_size < 4096 and not path.read_bytes().strip()


def check_source(source: str) -> None:
    """What can be checked before the model loads: task names, that files exist, every JSON line."""
    source = source.strip()
    if source == "default" or source == "synthetic":
        return
    if source.startswith("synthetic:"):
        unknown = [t.strip() for t in source.partition(":")[2].split(",") if t.strip() and t.strip() not in tasks.TASKS]
        if unknown:
            raise SourceError(f"--source {source}: unknown task(s) {unknown}; known: {', '.join(tasks.TASKS)}")
        return
    path = Path(source)
    if not path.exists():
        raise SourceError(f"--source {path}: no such file or folder (built-in sources: 'default', "
                          f"'synthetic:{','.join(tasks.TASKS)}')")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
    for p in files:
        if p.suffix == ".jsonl":
            read_jsonl(p)
        elif p.suffix == ".json" and _blank(p):
            raise SourceError(f"{p}: no records (the file is empty)")


def read_records(path: str | Path) -> list[dict]:
    """Rows of a local json/jsonl/parquet file, a folder of them, or a saved dataset."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"--source {path}: no such file or folder (built-in sources: 'default', "
                          f"'synthetic:{','.join(tasks.TASKS)}')")
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                          or (path / "state.json").exists()):
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # a damaged folder: name it rather than show datasets' internals
            raise SourceError(f"{path}: could not be read as a saved dataset ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            if len(splits) == 1 or "train" in ds:
                ds = ds[splits[0] if len(splits) == 1 else "train"]
            else:
                raise SourceError(f"{path}: a DatasetDict with splits {splits}; save the split you want alone")
        return ds.to_list()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _FORMATS)
    if not files:
        raise SourceError(f"{path}: no .json, .jsonl or .parquet files and not a saved dataset")
    kinds = {_FORMATS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        raise SourceError(f"{path}: expected .json, .jsonl or .parquet files of one kind, got "
                          f"{sorted({p.suffix or p.name for p in files})}")
    empty = [p for p in files if p.suffix != ".parquet" and _blank(p)]
    if empty:
        raise SourceError(f"{empty[0]}: no records (the file is empty)")
    if all(p.suffix == ".jsonl" for p in files):   # read here, line by line, so an error names the file and the line
        return [row for p in files for row in read_jsonl(p)]
    try:
        ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    except Exception as e:  # datasets raises many kinds; say which file and why
        raise SourceError(f"{path}: could not be read by datasets: {type(e).__name__}: {e}") from None
    return ds.to_list()


def _user(source, lengths, count_tokens, budget, truncate_middle) -> Prepared:
    path = Path(source)
    rows = read_records(path)
    if not rows:
        raise SourceError(f"{path}: no records")
    items, skipped = [], {}
    room_beyond_text = -budget(0)  # template + answer room: a text of n tokens needs length n + this
    for row_no, r in enumerate(rows):
        where = f"{path}, record {row_no}"
        prompt, context = r.get("prompt"), r.get("context")
        if prompt is None and context is None:
            raise SourceError(f"{where}: needs a 'prompt' or a 'context' field (fields present: {sorted(r)})")
        text = prompt if prompt is not None else context
        if not isinstance(text, str) or not text.strip():
            name = "prompt" if prompt is not None else "context"
            raise SourceError(f"{where}: field {name!r} is empty or not a string")
        question = r.get("question") or ""
        if not isinstance(question, str):
            raise SourceError(f"{where}: field 'question' must be a string")
        base = {"id": str(r.get("id") if r.get("id") is not None else f"{path.stem}-{row_no}"),
                "task": str(r.get("task") or "user"),
                "depth": float(r["depth"]) if r.get("depth") is not None else -1.0,
                "reference": str(r.get("reference") if r.get("reference") is not None else (r.get("answer") or ""))}
        if prompt is not None:
            full = prompt + (f"\n\n{question}" if question else "")
            own = r.get("length")
            if own is not None and (not isinstance(own, int) or isinstance(own, bool) or own <= 0):
                raise SourceError(f"{where}: field 'length' must be a positive integer, got {own!r}")
            if own is not None and lengths and own not in lengths:
                skipped["length not requested"] = skipped.get("length not requested", 0) + 1
                continue
            if own is None:
                n = count_tokens(full)
                fits = [L for L in sorted(lengths or []) if budget(L) >= n]
                own = fits[0] if fits else n + room_beyond_text
            items.append({**base, "length": int(own), "prompt": full})
            continue
        suffix = f"\n\n{question}" if question else ""
        if not lengths:
            items.append({**base, "length": count_tokens(context + suffix) + room_beyond_text,
                          "prompt": context + suffix})
            continue
        n_context, n_suffix = count_tokens(context), count_tokens(suffix) if suffix else 0
        for L in lengths:
            room = budget(L) - n_suffix
            if room <= 0:
                raise SourceError(f"{where}: length {L} leaves no room for the context after the question "
                                  f"({n_suffix} tokens) and the answer")
            if n_context < room:
                key = f"shorter than {L} tokens"
                skipped[key] = skipped.get(key, 0) + 1
                continue
            if truncate_middle is None:
                raise SourceError("truncate_middle is needed for 'context' records with lengths")
            items.append({**base, "id": f"{base['id']}@{L}", "length": int(L),
                          "prompt": truncate_middle(context, room) + suffix})
    if not items:
        why = "; ".join(f"{v} {k}" for k, v in skipped.items()) or "no usable records"
        raise SourceError(f"{path}: no calibration items left ({why}); use longer documents or shorter --lengths")
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SourceError(f"{path}: duplicate id {dup!r}; ids must be unique")
    return Prepared(items, f"user data {path} ({len(rows)} records)", {}, skipped)


__all__ = ["SourceError", "Prepared", "prepare", "read_records"]
