"""`moa_search.generate`: generation with the plan's compressed cache, its prompt prefilled in
chunks straight into the cache, and greedy decoding replayed as one CUDA graph per token.

    out = moa_search.generate(model, **enc, max_new_tokens=256)                  # [B, P + new]
    out = moa_search.generate(model, **enc, max_new_tokens=64, prefill_chunk=8192)  # long prompts

Why a loop of our own: transformers compiles the decode forward of a cache whose layers say
`is_compileable` (generate's `_valid_auto_compile_criteria`, then `torch.compile(fullgraph=True,
mode="reduce-overhead")`). The compressed cache keeps host counters that transformers' Cache API
needs (each layer's sequence length, which decides prefill/decode/chunk on the host) and
launches user Triton kernels; under fullgraph compilation the counters become guards that change
every token, so it would recompile at every step. Instead, as gpt-fast does, the prompt is
prefilled eagerly and one decode step — model forward, greedy pick, end-of-sequence bookkeeping,
position advance — is captured once as a CUDA graph and replayed per token. The step reads and
writes only device tensors allocated before the capture (the cache's buffers and counters,
CompressedKV.begin), so the replay is exactly the eager step. On the CPU (or with
loop="static") the same static step runs without the graph: the tests compare its tokens with
transformers' generate.

The compiled step (compile=..., the default of loop="graph" on CUDA): the step's model forward
runs without transformers' Cache, in the runtime's decode-only mode (Runtime.decode_only: every
attention call is the cache's append + split-K decode as one custom op,
torch.ops.moa_search.decode_step), so no host counter or Python state changes between tokens and
torch.compile (mode "default", fullgraph, static shapes but the cache buffers' lengths) traces it
once: inductor fuses the decoder layers' elementwise work (norms, rotary, residuals, SiLU * up)
around the opaque op, and our own CUDA graph captures the result as before. For the Llama family
the step's forward is moa_search.fused.decode_forward (q/k/v and gate/up as one matmul each, the
model's own modules for the rest) rather than transformers' forward. The uncompiled step
(compile=False) goes through the Cache API (MoaCache.update, Runtime staging).

Sampling, beam search and logits processors go through transformers' generate with the same
cache (loop="hf").
"""
from __future__ import annotations

import inspect

import torch

from .fused import decode_forward, fuse as fuse_projections
from .hf_adapter import MoaCache, cache_kwarg, runtime_of

# generation-config fields that change greedy tokens; when any is set the loop defers to transformers
_PROCESSORS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
               "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
               "sequence_bias", "encoder_repetition_penalty", "exponential_decay_length_penalty",
               "renormalize_logits", "watermarking_config")
_NEUTRAL = {"repetition_penalty": 1.0, "min_length": 0, "renormalize_logits": False, "encoder_repetition_penalty": 1.0}


def _greedy_only(model, kwargs) -> bool:
    gc = model.generation_config
    if kwargs.get("do_sample", gc.do_sample) or kwargs.get("num_beams", gc.num_beams or 1) > 1:
        return False
    known = {"do_sample", "num_beams", "pad_token_id", "eos_token_id", "use_cache", "return_dict_in_generate",
             "temperature", "top_k", "top_p"}
    if set(kwargs) - known or kwargs.get("return_dict_in_generate"):
        return False
    for name in _PROCESSORS:
        value = getattr(gc, name, None)
        if value not in (None, _NEUTRAL.get(name)) and value != 0 and value != []:
            return False
    return True


def real_lengths(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """int64 [B]: real tokens of each prompt row."""
    if mask is None:
        return torch.full((batch,), length, dtype=torch.long, device=device)
    return mask.long().sum(-1)


def positions(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Position ids [B, N] of a (left-)padded prompt, as transformers' generate makes them."""
    if mask is None:
        return torch.arange(length, device=device)[None].expand(batch, length)
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def prefill(model, cache: MoaCache, input_ids, attention_mask=None, chunk: int | None = None,
            lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt [B, P] into the empty compressed cache, in chunks of `chunk` tokens (None: at
    once); returns the last position's logits [B, V]. lengths: int64 [B] the real length of the
    whole prompt when this is only its beginning (default: this prompt's).

    Every chunk's rows use the spans of the whole prompt (Runtime.prompt_length), so the result
    is the one-shot prefill's; each chunk attends to the cached sink + windows and itself, so no
    dense cache of the prompt ever exists.
    """
    B, P = input_ids.shape
    ck = cache_kwarg(model)
    pos = positions(attention_mask, B, P, input_ids.device)
    step = P if not chunk or chunk >= P else int(chunk)
    runtime = runtime_of(model)
    if step < P or lengths is not None:
        if lengths is None:
            lengths = real_lengths(attention_mask, B, P, input_ids.device)
        runtime.prompt_length = lengths.to(torch.int64)
    try:
        with torch.no_grad():
            for c0 in range(0, P, step):
                c1 = min(P, c0 + step)
                out = model(input_ids=input_ids[:, c0:c1], position_ids=pos[:, c0:c1], use_cache=True, logits_to_keep=1,
                            attention_mask=None if attention_mask is None else attention_mask[:, :c1], **{ck: cache})
    finally:
        runtime.prompt_length = None
    return out.logits[:, -1]


class CompileError(RuntimeError):
    """torch.compile could not build the decode step."""


def _compiled_body(dec: "GreedyDecoder") -> None:
    """What torch.compile traces: one greedy step in decode-only mode (Runtime.decode_only): the
    cache's per-step state (ring rows and spans of every layer, CompressedKV.begin), the model
    forward without transformers' Cache (the attention calls decode on the runtime's cache), the
    greedy pick and its bookkeeping. Only device tensors change between steps."""
    dec.cache.kv.begin(1, decode=True)
    if dec.fused is not None:   # the Llama family: q/k/v and gate/up as one matmul each (moa_search.fused)
        logits = decode_forward(dec.model, dec.fused, dec.tok, dec.pos)
    else:
        logits = dec.model(input_ids=dec.tok, position_ids=dec.pos, use_cache=False, logits_to_keep=1).logits[:, -1]
    dec.advance(logits)


def _first_lines(e: BaseException) -> str:
    """'Type: first line' of an exception and of the one at the root of its causes."""
    def line(x):
        text = str(x).strip()
        return f"{type(x).__name__}: {text.splitlines()[0] if text else ''}"

    root = e
    while (getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = getattr(root, "inner_exception", None) or root.__cause__
    return line(e) if root is e else f"{line(e)} ({line(root)})"


_COMPILED: dict = {}
_RECOMPILE_LIMIT = 64


def compile_backend(compile) -> object | None:
    """The torch.compile backend that `compile` names (None = the uncompiled step): False/None ->
    None, True -> "inductor", a backend name or callable as given."""
    if compile is None or compile is False:
        return None
    return "inductor" if compile is True else compile


def compiled_decode(backend):
    """The decode step (_compiled_body) under torch.compile with `backend`, one wrapper per backend (dynamo keeps
    its compiled graphs on the function's code, so every decoder shares them).

    fullgraph: a graph break would put Python back between the layers, so it is an error.
    dynamic=False: the batch and the model's shapes are compile-time constants (inductor picks
    kernels for them); the cache buffers' lengths, which change with the prompt length and the
    plan, are marked dynamic by GreedyDecoder, so one compile serves every prompt of a batch.
    mode "default" (no inductor CUDA graphs): the step is captured in our own graph."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_compiled_body, backend=backend, fullgraph=True, dynamic=False)
    return _COMPILED[backend]


class GreedyDecoder:
    """One static-shaped greedy decode step over a filled MoaCache: every tensor it touches is
    allocated here or in the cache, so the step can be captured as a CUDA graph (`capture`) and
    replayed; `step` runs it eagerly (CPU, debugging, and the warm-up before the capture).

    first: int64 [B] the token picked from the prompt's logits; positions: int64 [B] its position.
    compile: None/False the uncompiled step (the model forward through transformers' Cache API,
    which advances the cache's host counters every step); else a torch.compile backend (True =
    "inductor"): the decode-only forward compiled (see the module doc), which leaves the host
    counters alone (greedy() sets them after the loop). fuse: the compiled forward of a Llama-family
    model concatenates its q/k/v and gate/up weights (moa_search.fused; False: transformers'
    forward, compiled as it is).
    """

    def __init__(self, model, cache: MoaCache, first, positions, max_new: int, eos: list[int], pad: int,
                 compile=None, fuse: bool = True):
        dev = first.device
        B = first.shape[0]
        self.model, self.cache, self.kw = model, cache, cache_kwarg(model)
        self.tok = first.view(B, 1).clone()
        self.pos = positions.view(B, 1).clone()
        self.eos = torch.tensor(eos or [-1], device=dev)
        self.pad = int(pad)
        self.out = torch.full((B, max_new), self.pad, dtype=torch.long, device=dev)
        self.out[:, 0] = first
        self.done = torch.isin(first, self.eos)
        self.t = torch.ones(1, dtype=torch.long, device=dev)          # next column of `out`
        self.graph = None
        self.extra = {}
        self.backend = compile_backend(compile)
        self.runtime = runtime_of(model)
        self.fused = fuse_projections(model) if self.backend is not None and fuse else None
        if self.backend is not None:
            # their lengths follow the prompt and the plan: the buffers' rows, the decode work items
            for t in (*cache.kv.keys, *cache.kv.values, *(w for w, _ in cache.kv.work)):
                if t.shape[1] > 1:
                    torch._dynamo.mark_dynamic(t, 1)
        elif "cache_position" in inspect.signature(model.forward).parameters:  # transformers < 5.2x
            self.extra["cache_position"] = torch.full((1,), cache.get_seq_length(), dtype=torch.long, device=dev)

    def step(self) -> None:
        if self.backend is None:
            logits = self.model(input_ids=self.tok, position_ids=self.pos, use_cache=True, logits_to_keep=1,
                                **self.extra, **{self.kw: self.cache}).logits[:, -1]
            self.advance(logits)
            return
        # Each batch size, plan sink and model shape is a compiled entry of its own (static shapes);
        # a process that serves many of them must not hit dynamo's default limit of 8, which fails
        # a fullgraph compile.
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"   # torch < 2.6
        limit = {name: max(getattr(cfg, name), _RECOMPILE_LIMIT)}
        with self.runtime.decode_only(self.cache.kv), cfg.patch(**limit):
            try:
                compiled_decode(self.backend)(self)
            except Exception as e:
                # No silent fallback to the uncompiled step: it is about 2x slower per token, which a
                # benchmark or a server would otherwise report as this path's speed. The error says
                # what failed and how to opt out.
                raise CompileError(
                    f"torch.compile (backend {getattr(self.backend, '__name__', self.backend)!r}) of the decode "
                    f"step failed: {_first_lines(e)}. Pass compile=False to moa_search.generate to run the "
                    "uncompiled step (same tokens, slower)") from e

    def advance(self, logits) -> None:
        """The greedy pick from logits [B, V] and its bookkeeping (in place)."""
        nxt = torch.where(self.done, self.pad, logits.argmax(-1))
        self.out.index_copy_(1, self.t, nxt[:, None])
        self.done |= torch.isin(nxt, self.eos)
        self.tok.copy_(nxt[:, None])
        self.pos.add_(1)
        self.t.add_(1)
        if "cache_position" in self.extra:
            self.extra["cache_position"].add_(1)

    def capture(self) -> None:
        """Run one step eagerly on a side stream (Triton compiles, cuBLAS picks its kernels), then
        capture the next one; `replay` runs it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def replay(self) -> None:
        self.graph.replay()


def greedy(model, input_ids, attention_mask=None, max_new_tokens: int = 1, prefill_chunk: int | None = None,
           graph: bool = True, eos_token_id=None, pad_token_id=None, check_every: int = 16,
           timings: dict | None = None, compile=None, fuse: bool = True) -> torch.Tensor:
    """Greedy generation with the compressed cache: [B, P] -> [B, P + new], transformers' tokens
    (rows that ended pad with pad_token_id; stops when every row ended).

    compile: the decode step's torch.compile backend (GreedyDecoder); None/False uncompiled.
    fuse: concatenated projections in the compiled step of a Llama-family model (GreedyDecoder).

    timings: a dict to fill (CUDA, synchronising): first_token_s (prefill + first token, from the
    call), capture_s (graph: the eager warm-up step + the capture), decode_s and decode_steps
    (the replays; without the graph every later step)."""
    import time

    t0 = time.perf_counter()
    gc = model.generation_config
    eos = gc.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = gc.pad_token_id if pad_token_id is None else pad_token_id
    pad = (eos[0] if eos else 0) if pad is None else pad
    B, P = input_ids.shape
    cache = MoaCache(model, max_length=P + max_new_tokens)
    logits = prefill(model, cache, input_ids, attention_mask, prefill_chunk)
    first = logits.argmax(-1)
    dec = GreedyDecoder(model, cache, first, real_lengths(attention_mask, B, P, input_ids.device), max_new_tokens,
                        eos, pad, compile=compile, fuse=fuse)
    steps = max_new_tokens - 1
    if timings is not None:
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        timings["first_token_s"] = t1 - t0
    seen = cache.get_seq_length()
    with torch.no_grad():
        done_steps = 0
        if graph and steps > 0:
            dec.capture()
            done_steps = 1
            if timings is not None:   # the eager warm-up step and the capture, apart from the replays
                torch.cuda.synchronize()
                timings["capture_s"] = time.perf_counter() - t1
                t1 = time.perf_counter()
            while done_steps < steps:
                dec.replay()
                done_steps += 1
                if eos and done_steps % check_every == 0 and bool(dec.done.all()):
                    break
        else:
            while done_steps < steps:
                dec.step()
                done_steps += 1
                if eos and done_steps % check_every == 0 and bool(dec.done.all()):
                    break
    for layer in cache.layers:  # the host counters (replays and the compiled step do not advance them)
        layer.seen = seen + done_steps
    if timings is not None:
        torch.cuda.synchronize()
        timings["decode_s"] = time.perf_counter() - t1
        timings["decode_steps"] = done_steps - (1 if graph and steps > 0 else 0)
    new = dec.out[:, :done_steps + 1]
    if eos:  # transformers stops after the step at which the last row ended
        ended = torch.isin(new, dec.eos)
        if bool(ended.any(-1).all()):
            new = new[:, :int(ended.float().argmax(-1).max()) + 1]
    return torch.cat([input_ids, new], 1)


def generate(model, input_ids=None, attention_mask=None, max_new_tokens: int | None = None,
             max_length: int | None = None, prefill_chunk: int | None = None, loop: str = "auto", compile=None,
             **kwargs):
    """model.generate with the plan's compressed cache. Returns the token ids [B, P + new].

    loop: "graph" greedy decoding replayed as one CUDA graph per token; "static" the same step
    without the graph; "hf" transformers' generate with the cache (sampling, beams, processors);
    "auto": "graph" for greedy decoding on CUDA, else "hf".
    compile: the decode step's forward under torch.compile (inductor fuses the dense work of the
    layers around the cache's decode op). None: on for loop="graph", off for loop="static";
    True: inductor; a torch.compile backend name (e.g. "aot_eager"); False: the uncompiled step.
    A failing compile raises CompileError (no silent fallback); compile=False is the opt-out.
    prefill_chunk: prefill the prompt in chunks of this many tokens straight into the compressed
    cache (memory follows the plan's KV density from the first token).
    """
    if input_ids is None:
        raise ValueError("moa_search.generate needs input_ids")
    P = input_ids.shape[1]
    if max_new_tokens is None:
        max_new_tokens = (max_length - P) if max_length is not None else model.generation_config.max_new_tokens
    if max_new_tokens is None or max_new_tokens < 1:
        raise ValueError(f"moa_search.generate needs max_new_tokens >= 1 (or max_length > the prompt's {P}), "
                         f"got {max_new_tokens}")
    if loop not in ("auto", "graph", "static", "hf"):
        raise ValueError(f"loop must be 'auto', 'graph', 'static' or 'hf', got {loop!r}")
    greedy_ok = _greedy_only(model, kwargs)
    if loop == "auto":
        loop = "graph" if greedy_ok and input_ids.is_cuda else "hf"
    if loop != "hf":
        if not greedy_ok:
            raise ValueError(f"loop={loop!r} runs greedy decoding only (no sampling, beams or logits processors); "
                             "use loop='hf'")
        if loop == "graph" and not input_ids.is_cuda:
            raise ValueError("loop='graph' needs CUDA; use loop='static' on the CPU")
        if compile is None:
            compile = loop == "graph"
        return greedy(model, input_ids, attention_mask, max_new_tokens, prefill_chunk, graph=loop == "graph",
                      eos_token_id=kwargs.get("eos_token_id"), pad_token_id=kwargs.get("pad_token_id"),
                      compile=compile)
    if compile not in (None, False):
        raise ValueError("compile applies to moa_search's own greedy loop (loop='graph' or 'static'), not loop='hf'")
    cache = MoaCache(model, max_length=P + max_new_tokens)
    if prefill_chunk and P > 1:  # the prompt but its last token; generate runs that one as the first step
        prefill(model, cache, input_ids[:, :-1], None if attention_mask is None else attention_mask[:, :-1],
                prefill_chunk, lengths=real_lengths(attention_mask, input_ids.shape[0], P, input_ids.device))
    kwargs = dict(kwargs, max_new_tokens=max_new_tokens)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return model.generate(input_ids=input_ids, **kwargs, **{cache_kwarg(model): cache})


__all__ = ["generate", "greedy", "prefill", "GreedyDecoder", "CompileError", "compile_backend", "compiled_decode",
           "positions", "real_lengths"]
