"""The shipped default sets: a small calibration set and a held-out eval set.

    calibration_data/default_calibration.jsonl   what `moa calibrate` uses with no --source
    calibration_data/default_eval.jsonl          held-out items for `moa eval` (other seed)
    calibration_data/defaults.json               the recipes (tasks, lengths, depths, seeds) and
                                                 the token-count convention used to build them

Each line of the JSONL files is one raw builder item (no model answers: the model answers
at calibrate time): {"id", "task", "length", "depth", "prompt", "reference"}.

Token counts. The shipped files are counted with the embedded demo model's tokenizer
(moa_search/demo_model), so their `length` is exact for the demo model; under another
model's tokenizer a prompt's real length differs (kv_retrieval most: its keys and numbers
split differently). defaults.json records which counter was used. `moa calibrate` does not
read these files: its default source rebuilds the calibration recipe with the model's own
tokenizer. To regenerate (after retraining the demo tokenizer) or check the files:

    python -m moa_search.calibration_data.defaults                      # demo tokenizer
    python -m moa_search.calibration_data.defaults --tokenizer DIR      # another tokenizer
    python -m moa_search.calibration_data.defaults --approx             # no tokenizer
    python -m moa_search.calibration_data.defaults --check              # files == recipes?
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moa_search.calibration_data.tasks import TASKS, approx_count_tokens, build_items

HERE = Path(__file__).resolve().parent
DEFAULT_CALIBRATION = HERE / "default_calibration.jsonl"
DEFAULT_EVAL = HERE / "default_eval.jsonl"
SIDECAR = HERE / "defaults.json"

# name -> recipe. A recipe is one or more groups of lengths; each group has its own number
# of items per (task, length), placed at evenly spread depths (tasks.depths_for).
RECIPES: dict[str, dict] = {
    "calibration": {
        "file": DEFAULT_CALIBRATION.name,
        "tasks": list(TASKS),
        "seed": 0,
        "groups": [{"lengths": [1024, 2048, 4096], "per_length": 4}],
    },
    "eval": {
        "file": DEFAULT_EVAL.name,
        "tasks": list(TASKS),
        "seed": 1,  # a different seed from calibration: held-out items
        "groups": [{"lengths": [1024, 2048, 4096, 8192], "per_length": 5},
                   {"lengths": [16384], "per_length": 3}],
    },
}

APPROX = "approx_count_tokens: regex [A-Za-z]{1,8}|\\d|[^A-Za-z\\d\\s]|\\n (moa_search.calibration_data.tasks)"
DEMO_TOKENIZER = "moa_search/demo_model"  # the embedded demo model: the shipped sets are counted with it


def build_default(name: str, count_tokens=approx_count_tokens) -> list[dict]:
    """Rebuild one default set from its recipe (deterministic)."""
    if name not in RECIPES:
        raise ValueError(f"unknown default set {name!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[name]
    items = []
    for g in r["groups"]:
        items += build_items(r["tasks"], g["lengths"], g["per_length"], r["seed"], count_tokens)
    return items


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    return out


def load_default(name: str) -> list[dict]:
    """The shipped items of one default set ('calibration' or 'eval')."""
    if name not in RECIPES:
        raise ValueError(f"unknown default set {name!r}; known: {', '.join(RECIPES)}")
    return read_jsonl(HERE / RECIPES[name]["file"])


def sidecar() -> dict:
    """defaults.json: recipes and the token-count convention of the shipped files."""
    return json.loads(SIDECAR.read_text())


def resolve_tokenizer(spec: str) -> Path:
    """A tokenizer path as recorded in defaults.json: "moa_search/..." is inside the package
    (found wherever it is installed), anything else a plain path."""
    if spec.startswith("moa_search/"):
        package = Path(__file__).absolute().parent.parent   # moa_search/ (this is moa_search.calibration_data)
        return package.resolve() / spec[len("moa_search/"):]
    return Path(spec)


def tokenizer_counter(tokenizer_path: str):
    """count_tokens for a tokenizer directory, and a description of it for defaults.json."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_tokenizer(tokenizer_path)))

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    return count, f"tokenizer {tokenizer_path} ({type(tok).__name__}, vocab {len(tok)}), no special tokens"


def tokenizer_digest(tokenizer_path: str) -> str:
    """sha256 (16 hex) of a tokenizer directory's tokenizer.json: tells a retrained tokenizer apart."""
    import hashlib

    f = resolve_tokenizer(tokenizer_path) / "tokenizer.json"
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.exists() else ""


def recorded_tokenizer(side: dict | None = None) -> str | None:
    """The tokenizer the shipped files were counted with (None: the approximation)."""
    side = side if side is not None else sidecar()
    return side.get("tokenizer")


def write_defaults(folder: str | Path = HERE, tokenizer: str | None = None) -> dict:
    """Write both JSONL files and defaults.json into `folder`; returns the sidecar dict."""
    from moa_search.files import atomic_write_text

    folder = Path(folder)
    count, convention = (approx_count_tokens, APPROX) if tokenizer is None else tokenizer_counter(tokenizer)
    side = {"about": "raw builder items (moa_search.calibration_data.tasks.build_items); rebuild with "
                     "`python -m moa_search.calibration_data.defaults`",
            "token_count": convention, "tokenizer": tokenizer,
            "tokenizer_sha256": tokenizer_digest(tokenizer) if tokenizer else None, "sets": {}}
    for name, r in RECIPES.items():
        items = build_default(name, count)
        atomic_write_text(folder / r["file"], "".join(json.dumps(it) + "\n" for it in items))
        os.chmod(folder / r["file"], 0o644)  # temp files are created private; these are package data
        side["sets"][name] = {**r, "items": len(items),
                              "tokens_by_length": _tokens_by_length(items, count)}
    atomic_write_text(folder / SIDECAR.name, json.dumps(side, indent=1) + "\n")
    os.chmod(folder / SIDECAR.name, 0o644)
    return side


def _tokens_by_length(items: list[dict], count) -> dict:
    """Mean counted prompt tokens per target length (a record of how close the build came)."""
    acc: dict[int, list[int]] = {}
    for it in items:
        acc.setdefault(it["length"], []).append(count(it["prompt"]))
    return {str(k): round(sum(v) / len(v), 1) for k, v in sorted(acc.items())}


def check_defaults(folder: str | Path = HERE, tokenizer: str | None = None) -> list[str]:
    """Differences between the shipped files and a rebuild from their recipes (empty: identical)."""
    problems = []
    side_path = Path(folder) / SIDECAR.name
    if tokenizer and side_path.exists():
        side = json.loads(side_path.read_text())
        if side.get("tokenizer") == tokenizer and side.get("tokenizer_sha256") != tokenizer_digest(tokenizer):
            problems.append(f"tokenizer {tokenizer} changed since the default sets were built; regenerate them with "
                            f"`python -m moa_search.calibration_data.defaults --tokenizer {tokenizer}`")
    count = approx_count_tokens if tokenizer is None else tokenizer_counter(tokenizer)[0]
    for name, r in RECIPES.items():
        shipped = read_jsonl(Path(folder) / r["file"])
        rebuilt = build_default(name, count)
        if shipped != rebuilt:
            bad = next((a.get("id") for a, b in zip(shipped, rebuilt) if a != b), None)
            problems.append(f"{r['file']}: {len(shipped)} shipped vs {len(rebuilt)} rebuilt items"
                            + (f", first difference at {bad}" if bad else ""))
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moa_search.calibration_data.defaults",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="count tokens with this tokenizer directory instead of the approximation "
                                       f"(the shipped files use {DEMO_TOKENIZER}, the embedded demo model's; "
                                       "'moa_search/...' paths resolve inside the installed package)")
    p.add_argument("--approx", action="store_true", help="count with tasks.approx_count_tokens (no tokenizer)")
    p.add_argument("--check", action="store_true", help="only check that the shipped files match their recipes")
    p.add_argument("--folder", default=str(HERE), help="where the files live (default: the package folder)")
    args = p.parse_args(argv)
    if args.check:
        tok = args.tokenizer or (recorded_tokenizer() if SIDECAR.exists() else None)
        problems = check_defaults(args.folder, tok)
        print("\n".join(problems) or "default sets match their recipes")
        return 1 if problems else 0
    tok = None if args.approx else (args.tokenizer or DEMO_TOKENIZER)
    side = write_defaults(args.folder, tok)
    for name, s in side["sets"].items():
        print(f"{s['file']}: {s['items']} items, mean tokens by length {s['tokens_by_length']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
