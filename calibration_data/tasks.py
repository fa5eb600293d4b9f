"""Synthetic long-range tasks: controlled length, controlled position of the needed fact.

MoA's calibration data must make the model reach far back (DESIGN.md section 9). Every
task here hides one fact (or a chain of facts) at a chosen relative depth of a long
prompt and asks for it at the end, so the answer is short and checked by exact match.

    kv_retrieval   many lines "line <word-key>: REGISTER_CONTENT is <number>"; which number
                   does line <key> hold?                          reference: "48213"
    passkey        filler sentences with "The pass key is 71432. Remember it. ..."
                                                                  reference: "71432"
    var_tracking   "VAR QKZMT = 12345" ... "VAR PLWRA = QKZMT" ... (a chain of hops, plus a
                   distractor chain, among filler); which variables hold 12345?
                                                                  reference: "QKZMT PLWRA JXNEB"

Every prompt ends with a question line and an answer cue line ("Answer: The pass key is"),
so even a small plain-text model answers on the next tokens; the reference is the exact
continuation (after one space) the model should write. Chat models get the cue where they
would write it: `split_answer_cue` separates the last "Answer: ..." line, the user turn holds
the rest and the assistant turn starts with the cue ("The pass key is"), see
moa_search.calibrate.prompt_ids.

Length. `make_item(..., n_tokens, count_tokens)` builds a prompt of at most `n_tokens`
tokens (short of it by less than one line) as counted by `count_tokens(str) -> int`
(e.g. `len(tok(s).input_ids)`). The prompt is built in whole lines, each line counted once
(a tokenizer's fixed overhead, such as a BOS token, is measured on "" and subtracted), so
a prompt of N tokens costs about N/10 tokenizer calls, not a loop over the whole prompt.
Lines end in "\n", so for BPE tokenizers the line counts add up to the prompt's count
(within a token or two). `approx_count_tokens` (letter runs, digits, marks, newlines)
counts when no tokenizer is at hand; the shipped default sets are counted with the demo
model's tokenizer (see calibration_data/defaults.py).

Depth. The needed fact's line starts at about `depth` (0..1) of the context body, measured
in tokens (0: right after the instructions; 1: right before the question).

Determinism. All randomness comes from the `random.Random` passed in; `build_items`
seeds one per item from (seed, task, length, k), so an item does not change when other
tasks or lengths are added to a build.
"""
from __future__ import annotations

import random
import re
from typing import Callable, Iterator

CountTokens = Callable[[str], int]

# ----------------------------------------------------------------------------- text pools

# Key words for kv_retrieval: ASCII, lowercase, common; keys are "word-word" pairs.
WORDS = (
    "apple amber anchor arrow autumn badge bamboo banner barrel basket beacon berry blanket "
    "bottle branch breeze bridge bronze bucket butter cabin cactus camera candle canyon carpet "
    "castle cedar cherry circle cliff clover cobalt comet copper coral cotton crater crystal "
    "dagger desert diamond dolphin dragon drum eagle ember engine falcon feather fiddle forest "
    "fossil garden garlic ginger glacier goblet granite gravel harbor hammer hazel helmet honey "
    "island ivory jacket jasmine jungle kettle kitten ladder lantern lemon lizard lobster magnet "
    "maple marble meadow melon mirror monkey mosaic needle nickel noodle oasis olive orbit otter "
    "paddle palace panther parrot pebble pepper piano pillow pirate planet pocket pumpkin puzzle "
    "quartz rabbit radish raven ribbon river rocket saddle salmon sapphire shadow silver spider "
    "spiral sponge summit tablet temple thunder tiger timber tomato tulip tunnel turtle velvet "
    "violet walnut wagon walrus willow window winter wizard yarrow zebra zephyr"
).split()

# Filler for passkey and var_tracking: plain sentences that carry no numbers or names.
FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
    "There and back again.", "The river runs to the sea.", "Birds sing in the morning.",
    "The road is long and quiet.", "A cat sleeps by the window.", "The wind moves the trees.",
    "Snow falls on the hills in winter.", "The market opens early.", "Bread is baked at dawn.",
    "The lamp gives a warm light.", "Clouds drift over the fields.", "The bell rings at noon.",
    "A boat waits at the harbor.", "The garden is full of flowers.", "Rain taps on the roof.",
    "The old clock ticks slowly.", "Children play in the park.", "The stars come out at night.",
)

# letters in runs of up to 8, each digit, each other mark, each newline: close to what a
# byte-level BPE with a vocabulary of ~4-16k and one token per digit (as Llama's tokenizers and
# the embedded demo model's do) produces on English text; it undercounts rare words and
# random letter names (kv_retrieval keys, var_tracking names), so use a real tokenizer when
# the length matters.
_TOKEN_RE = re.compile(r"[A-Za-z]{1,8}|\d|[^A-Za-z\d\s]|\n")


def approx_count_tokens(text: str) -> int:
    """Tokenizer-free length estimate: letter runs (split every 8), single digits, other
    marks, newlines.

    The convention of the shipped default sets. A BPE trained on similar English/code text
    gives a count of the same order; at calibrate time the model's own tokenizer is used.
    """
    return len(_TOKEN_RE.findall(text))


# ----------------------------------------------------------------------------- assembly


class _Counter:
    """count_tokens per line, minus the tokenizer's fixed overhead, memoised per call."""

    def __init__(self, count_tokens: CountTokens):
        self.fn = count_tokens
        self.overhead = count_tokens("")
        self.cache: dict[str, int] = {}

    def __call__(self, line: str) -> int:
        n = self.cache.get(line)
        if n is None:
            n = max(self.fn(line) - self.overhead, 0)
            if len(self.cache) < 4096:
                self.cache[line] = n
        return n


def _assemble(task: str, n_tokens: int, count: _Counter, head: list[str], needles: list[tuple[float, str]],
              fillers: Iterator[str], tail: list[str]) -> str:
    """head + fillers with needles inserted at relative token depths + tail: at most n_tokens
    tokens (by the line counts), short of it by less than one filler line.

    needles: (depth in [0, 1], line); kept in the given order where depths tie.
    """
    fixed = sum(count(x) for x in head) + sum(count(x) for _, x in needles) + sum(count(x) for x in tail)
    budget = n_tokens - fixed
    if budget < 0:
        raise ValueError(f"n_tokens={n_tokens} is too small for task {task!r}: its instructions, question and "
                         f"needed facts alone take {fixed} tokens")
    body, sizes, used = [], [], 0
    for line in fillers:
        c = count(line)
        if used + c > budget:  # never overshoot: a prompt plus its answer room must fit its length
            break
        body.append(line)
        sizes.append(c)
        used += c
        if used >= budget:
            break
    # insertion index of each needle: first filler line whose start is at >= depth of the body
    starts, acc = [], 0
    for c in sizes:
        starts.append(acc)
        acc += c
    starts.append(acc)
    order = sorted(range(len(needles)), key=lambda i: (needles[i][0], i))
    out, k = list(head), 0
    for idx in range(len(body) + 1):
        while k < len(order) and starts[idx] >= needles[order[k]][0] * used - 1e-9:
            out.append(needles[order[k]][1])
            k += 1
        if idx < len(body):
            out.append(body[idx])
    return "".join(out + tail)


def _filler_lines(rng: random.Random) -> Iterator[str]:
    while True:
        yield " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 4))) + "\n"


def _fresh(make, used: set) -> str:
    """make() until it gives something not in `used`; record and return it."""
    while True:
        x = make()
        if x not in used:
            used.add(x)
            return x


def _number(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


# ----------------------------------------------------------------------------- tasks


def kv_retrieval(rng: random.Random, n_tokens: int, count_tokens: CountTokens, depth: float) -> dict:
    count = _Counter(count_tokens)
    used_keys, used_values = set(), set()

    def line(key, value):
        return f"line {key}: REGISTER_CONTENT is {value}\n"

    def key():
        return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"

    target_key, target_value = _fresh(key, used_keys), _fresh(lambda: _number(rng), used_values)

    def fillers():
        while True:
            yield line(_fresh(key, used_keys), _fresh(lambda: _number(rng), used_values))

    head = ["Below is a record of lines. Each line starts with 'line' and a name, and ends with the "
            "REGISTER_CONTENT of that line, a number. Remember the number of every line: at the end "
            "you will be asked for the REGISTER_CONTENT of one line.\n"]
    tail = [f"Question: What is the REGISTER_CONTENT in line {target_key}?\n",
            f"Answer: The REGISTER_CONTENT in line {target_key} is"]
    prompt = _assemble("kv_retrieval", n_tokens, count, head, [(depth, line(target_key, target_value))],
                       fillers(), tail)
    return {"prompt": prompt, "reference": target_value}


def passkey(rng: random.Random, n_tokens: int, count_tokens: CountTokens, depth: float) -> dict:
    count = _Counter(count_tokens)
    key = _number(rng)
    head = ["There is a pass key hidden inside a lot of irrelevant text. Find it and remember it: "
            "you will be asked for it at the end.\n"]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    tail = ["Question: What is the pass key?\n", "Answer: The pass key is"]
    prompt = _assemble("passkey", n_tokens, count, head, [(depth, needle)], _filler_lines(rng), tail)
    return {"prompt": prompt, "reference": key}


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))


def var_tracking(rng: random.Random, n_tokens: int, count_tokens: CountTokens, depth: float,
                 hops: int = 3, distractors: int = 1) -> dict:
    """A chain VAR A = value, VAR B = A, VAR C = B (`hops` variables) whose first line sits
    at `depth` and whose later hops follow at random depths after it; `distractors` other
    chains with other values anywhere. Answer: the chain's names in order, space-separated."""
    count = _Counter(count_tokens)
    names: set[str] = set()
    values: set[str] = set()

    def fresh_name():
        return _fresh(lambda: _var_name(rng), names)

    def fresh_value():
        return _fresh(lambda: _number(rng), values)

    def chain(first_depth: float, later: list[float]) -> tuple[str, list[str], list[tuple[float, str]]]:
        value, chain_names = fresh_value(), [fresh_name() for _ in range(hops)]
        lines = [(first_depth, f"VAR {chain_names[0]} = {value}\n")]
        for prev, cur, d in zip(chain_names, chain_names[1:], later):
            lines.append((d, f"VAR {cur} = {prev}\n"))
        return value, chain_names, lines

    later = sorted(depth + (1.0 - depth) * rng.random() for _ in range(hops - 1))
    value, chain_names, needles = chain(depth, later)
    for _ in range(distractors):
        ds = sorted(rng.random() for _ in range(hops))
        needles += chain(ds[0], ds[1:])[2]
    head = ["Memorize and track the chain of variable assignments hidden in the following text. "
            "A line VAR B = A means B has the same value as A.\n"]
    tail = [f"Question: Which variables are assigned the value {value} in the text above? List them in order.\n",
            f"Answer: The variables assigned the value {value} are"]
    prompt = _assemble("var_tracking", n_tokens, count, head, needles, _filler_lines(rng), tail)
    return {"prompt": prompt, "reference": " ".join(chain_names)}


TASKS: dict[str, Callable[..., dict]] = {
    "kv_retrieval": kv_retrieval,
    "passkey": passkey,
    "var_tracking": var_tracking,
}


# ----------------------------------------------------------------------------- API


def make_item(task: str, rng: random.Random, n_tokens: int, count_tokens: CountTokens = approx_count_tokens,
              depth: float | None = None, **options) -> dict:
    """One prompt of about n_tokens tokens with the needed fact at relative depth `depth`.

    Returns {"task", "prompt", "reference", "depth"}; depth=None draws one from rng.
    `options` go to the task builder (var_tracking: hops, distractors).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    out = TASKS[task](rng, int(n_tokens), count_tokens, float(depth), **options)
    return {"task": task, "prompt": out["prompt"], "reference": out["reference"], "depth": float(depth)}


def depths_for(per_length: int) -> list[float]:
    """per_length depths spread evenly over [0, 1] (0.5 for a single item)."""
    if per_length <= 1:
        return [0.5] * max(per_length, 0)
    return [round(k / (per_length - 1), 4) for k in range(per_length)]


def build_items(tasks: list[str], lengths: list[int], per_length: int, seed: int,
                count_tokens: CountTokens = approx_count_tokens, task_options: dict | None = None,
                excess: Callable[[str, int], int] | None = None) -> list[dict]:
    """per_length items for every (task, length), depths spread evenly over [0, 1].

    Each item: {"id": f"{task}-{length}-{k}", "task", "length" (target), "depth", "prompt",
    "reference"}. Item k of (task, length) is seeded from (seed, task, length, k) alone.

    excess(prompt, length): how many tokens the prompt as the model will see it (chat template,
    answer room) is over `length` (<= 0: it fits). Given, each item is rebuilt shorter by that
    much until it fits, so a prompt never exceeds its length whatever the template adds.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    if per_length < 1:
        raise ValueError(f"per_length must be >= 1, got {per_length}")
    items = []
    for task in tasks:
        for length in lengths:
            for k, depth in enumerate(depths_for(per_length)):
                opts = (task_options or {}).get(task, {})
                n = length
                item = make_item(task, random.Random(f"{seed}-{task}-{length}-{k}"), n, count_tokens, depth, **opts)
                for _ in range(8 if excess else 0):
                    over = excess(item["prompt"], length)
                    if over <= 0:
                        break
                    # the same seed: the same facts, fewer filler lines. The builder fills whole lines
                    # up to n, so aim below what this prompt counts, not just below n
                    n = min(n, count_tokens(item["prompt"])) - over
                    item = make_item(task, random.Random(f"{seed}-{task}-{length}-{k}"), n, count_tokens, depth,
                                     **opts)
                else:
                    if excess and excess(item["prompt"], length) > 0:
                        raise ValueError(f"{task}-{length}-{k}: could not fit the prompt within {length} tokens")
                items.append({"id": f"{task}-{length}-{k}", "task": task, "length": int(length),
                              "depth": item["depth"], "prompt": item["prompt"], "reference": item["reference"]})
    return items


def is_correct(answer: str, reference: str) -> bool:
    """Exact-match scoring anywhere in the answer: the reference's words appear as whole words,
    in this order ("71432" matches " 71432." but not "714321"; "QKZMT PLWRA JXNEB" matches
    "QKZMT, PLWRA and JXNEB" and the list a chat model writes, "1. VAR QKZMT = 12345\n2. VAR
    PLWRA = QKZMT ...", but not "QKZMT JXNEB PLWRA"). As RULER's string match for multi-word
    answers, a wrong name listed beside the right ones is not penalised."""
    words = reference.split()
    if not words:
        return False
    pattern = r"[\s\S]*?".join(r"(?<![\w])" + re.escape(w) + r"(?![\w])" for w in words)
    return re.search(pattern, answer) is not None


ANSWER_LABEL = "Answer:"


def split_answer_cue(prompt: str) -> tuple[str, str | None]:
    """(the prompt without its answer cue line, the cue) when the last line is "Answer: <cue>"
    (the builders' convention), else (prompt, None). "...?\nAnswer: The pass key is" ->
    ("...?\n", "The pass key is")."""
    head, sep, last = prompt.rpartition("\n")
    if last.startswith(ANSWER_LABEL) and last[len(ANSWER_LABEL):].strip():
        return head + sep, last[len(ANSWER_LABEL):].strip()
    return prompt, None


__all__ = ["TASKS", "WORDS", "FILLER", "approx_count_tokens", "make_item", "build_items", "depths_for", "is_correct",
           "split_answer_cue"]
