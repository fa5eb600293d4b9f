"""Influence profiler (issue 3): reference vs brute-force autograd, fused kernel vs reference,
response masking, resume, clear errors, the CLI, and (issue 8) 2 ranks vs 1 rank."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import interrupt_on_call, run_cli, tiny_model
from moa_search.errors import MoaError
from moa_search.profiler import profile as P
from moa_search.profiler.capture import SampleInfluence, dense_profiling
from moa_search.profiler.io import ProfileError, load_profile
from moa_search.profiler.reference import EPS, block_sum, dense_backward, dense_forward, influence_reference


def _dataset(lengths, vocab=97, seed=0, answer=6, target=None):
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        row = dict(id=f"s{i}", task="t", input_ids=ids, response_start=n - answer - 2, response_end=n - 2, n_tokens=n)
        if target is not None:
            row["length"] = target
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def _sample(model, ids, rs, re, bs, backend="reference"):
    state = SampleInfluence(backend=backend, block_size=bs)
    with dense_profiling(model, state):
        infl, loss = P.sample_influence(model, ids, rs, re, state, "t")
    return infl, loss


# ----------------------------------------------------------------------------- brute force


_BRUTE = {}


def _brute_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Eager attention that materialises S and A and keeps their gradients (batch 1, causal)."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    n = query.shape[2]
    s = (query @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    s.retain_grad()
    a = torch.softmax(s, dim=-1)
    a.retain_grad()
    _BRUTE[module.layer_idx] = (s, a)
    return (a @ v).transpose(1, 2).contiguous(), a


def _brute_influence(model, ids, rs, re, bs):
    from transformers import AttentionInterface

    AttentionInterface.register("brute_test", _brute_attention)
    prev = model.config._attn_implementation
    model.set_attn_implementation("brute_test")
    try:
        _BRUTE.clear()
        t = torch.tensor([ids])
        emb = model.get_input_embeddings()(t).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, use_cache=False).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[rs - 1: re - 1], t[0, rs:re])
        loss.backward()
    finally:
        model.set_attn_implementation(prev)
    out = []
    n = len(ids)
    nb = math.ceil(n / bs)
    for layer in range(len(_BRUTE)):
        s, a = _BRUTE[layer]
        G = a.grad[0]                                     # dL/dA
        A = a.detach()[0]
        # first-order change of dropping (i, j) and renormalising row i: -A_ij (G_ij - sum_k A_ik G_ik) / (1 - A_ij)
        ds_formula = A * (G - (A * G).sum(-1, keepdim=True))
        assert torch.allclose(ds_formula, s.grad[0], rtol=1e-9, atol=1e-12)  # the numerator is dL/dS
        e = s.grad[0].abs() / (1 - A).clamp_min(EPS)
        out.append(torch.stack([block_sum(e[h], bs, nb) for h in range(e.shape[0])]))
    return torch.stack(out), float(loss.detach())


def test_reference_equals_bruteforce_autograd():
    model = tiny_model(layers=2, heads=4, kv_heads=2, head_dim=8, vocab=61, seed=1).double()
    ids = torch.randint(0, 61, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    rs, re, bs = 28, 39, 8                                # answer in the middle; 45 = 5 blocks + tail
    got, loss = _sample(model, ids, rs, re, bs)
    want, want_loss = _brute_influence(model, ids, rs, re, bs)
    assert got.shape == want.shape == (2, 4, 6, 6)
    assert abs(loss - want_loss) < 1e-12
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_response_mask_respected():
    model = tiny_model(layers=2, heads=4, kv_heads=2, head_dim=8, vocab=61, seed=2).double()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 61, (40,), generator=g).tolist()
    rs, re, bs = 20, 27, 8
    base, _ = _sample(model, ids, rs, re, bs)
    # rows i >= re - 1 predict nothing inside the answer: no gradient reaches them, in any layer
    first_dead_block = math.ceil((re - 1) / bs)
    assert base[:, :, first_dead_block:].abs().max() == 0
    assert base[:, :, : first_dead_block].abs().max() > 0
    # tokens after the answer do not matter at all
    changed = ids[:re] + torch.randint(0, 61, (40 - re,), generator=g).tolist()
    after, _ = _sample(model, changed, rs, re, bs)
    torch.testing.assert_close(after, base, rtol=0, atol=0)
    # ...while moving the answer's span changes the profile
    other, _ = _sample(model, ids, rs - 6, re - 6, bs)
    assert (other - base).abs().max() > 1e-3 * base.abs().max()


def test_gradient_checkpointing_gives_the_same_profile():
    model = tiny_model(layers=2, heads=4, kv_heads=2, head_dim=8, vocab=61, seed=3).double()
    ids = torch.randint(0, 61, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    plain, _ = _sample(model, ids, 25, 33, 8)
    P.enable_activation_checkpointing(model)
    try:
        ckpt, _ = _sample(model, ids, 25, 33, 8)
    finally:
        P.enable_activation_checkpointing(model, False)
    torch.testing.assert_close(ckpt, plain, rtol=1e-12, atol=1e-15)


def test_dense_attention_math_matches_sdpa_autograd():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    do = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True, scale=0.3)
    grads = torch.autograd.grad(want, (q, k, v), do)
    o, lse = dense_forward(q.detach(), k.detach(), v.detach(), 0.3, chunk_elems=500)   # several chunks
    torch.testing.assert_close(o, want.detach())
    for got, ref in zip(dense_backward(do, q.detach(), k.detach(), v.detach(), o, lse, 0.3, chunk_elems=500), grads):
        torch.testing.assert_close(got, ref)


def test_reference_chunking_does_not_change_result():
    g = torch.Generator().manual_seed(1)
    q, do = torch.randn(1, 4, 70, 16, generator=g), torch.randn(1, 4, 70, 16, generator=g)
    k, v = torch.randn(1, 2, 70, 16, generator=g), torch.randn(1, 2, 70, 16, generator=g)
    _, lse = dense_forward(q, k, v, 0.25)
    whole = influence_reference(q, k, v, do, lse, 0.25, 16)
    chunked = influence_reference(q, k, v, do, lse, 0.25, 16, chunk_elems=16 * 70)   # one block per chunk
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert torch.equal(whole.triu(1), torch.zeros_like(whole))                       # causal blocks only


# ----------------------------------------------------------------------------- fused kernel


def _random_case(B, Hq, Hkv, N, D, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = lambda h: (torch.randn(B, h, N, D, generator=g) * 1.5).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v, do = t(Hq), t(Hkv), t(Hkv), t(Hq) * 0.1
    o, lse = dense_forward(q, k, v, D ** -0.5)
    return q, k, v, do, lse.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,N,D,bs", [(2, 4, 2, 100, 16, 16), (1, 3, 1, 64, 32, 32), (1, 2, 2, 33, 24, 16)])
def test_fused_kernel_equals_reference(dtype, B, Hq, Hkv, N, D, bs):
    from moa_search.kernels.influence import influence_triton

    q, k, v, do, lse = _random_case(B, Hq, Hkv, N, D, dtype, seed=N + D)
    want = influence_reference(q, k, v, do, lse, D ** -0.5, bs)
    got = influence_triton(q, k, v, do, lse, D ** -0.5, bs)
    assert got.shape == (B, Hq, math.ceil(N / bs), math.ceil(N / bs))
    torch.testing.assert_close(got, want.float(), rtol=2e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("D", [16, 24])
def test_influence_ignores_lse_rounding(D):
    """The lse comes from another kernel (the flash forward) with other rounding than the scores
    the profile recomputes. Both paths renormalise each row, so the profile equals the float64
    one whatever the lse's rounding, and a single-key row (row 0, A = 1) contributes exactly 0
    instead of |dP| * 1e-6 / EPS."""
    from moa_search.kernels.influence import influence_triton

    B, Hq, Hkv, N, bs = 1, 2, 1, 33, 16
    q, k, v, do, lse = _random_case(B, Hq, Hkv, N, D, torch.float32, seed=7)
    exact = influence_reference(q.double(), k.double(), v.double(), do.double(),
                                dense_forward(q.double(), k.double(), v.double(), D ** -0.5)[1], D ** -0.5, bs)
    noisy = lse + 1e-6 * torch.randn(lse.shape, generator=torch.Generator().manual_seed(1)) * lse.abs()
    for fn in (influence_reference, influence_triton):
        got = fn(q, k, v, do, noisy, D ** -0.5, bs)
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-6 * float(exact.abs().max()))
    one_row = influence_triton(q[:, :, :1], k[:, :, :1], v[:, :, :1], do[:, :, :1], noisy[:, :, :1], D ** -0.5, bs)
    assert one_row.abs().max() == 0


def test_fused_profile_equals_reference_profile(tmp_path):
    model = tiny_model(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=61, seed=5)
    ds = _dataset([60, 50], vocab=61)
    common = dict(lengths=[64], block_size=16, progress=False, plots=False)
    P.profile_model(model, ds, P.ProfileSettings(backend="reference", **common), tmp_path / "ref")
    P.profile_model(model, ds, P.ProfileSettings(backend="triton", **common), tmp_path / "tri")
    a, b = load_profile(tmp_path / "ref" / "influence_64.safetensors"), load_profile(tmp_path / "tri" / "influence_64.safetensors")
    assert a.samples == b.samples == 2 and b.extra["backend"] == "triton"
    torch.testing.assert_close(b.influence, a.influence, rtol=1e-4, atol=1e-6 * float(a.influence.abs().max()))


@pytest.mark.gpu
def test_gpu_bf16_kernel_and_flash_path():
    from moa_search.kernels.influence import influence_triton
    from moa_search.profiler import capture

    for (B, Hq, Hkv, N, D, bs) in [(1, 8, 2, 1000, 128, 64), (2, 4, 4, 517, 64, 32), (1, 4, 1, 2048, 128, 128)]:
        q, k, v, do, _ = _random_case(B, Hq, Hkv, N, D, torch.bfloat16, seed=N, device="cuda")
        # the flash forward's lse and gradients agree with the float32 math
        o, lse, aux = capture.dense_forward(q, k, v, D ** -0.5)
        assert aux[0] == "flash"
        o_ref, lse_ref = dense_forward(q, k, v, D ** -0.5)
        torch.testing.assert_close(lse.float(), lse_ref, rtol=1e-3, atol=1e-2)
        torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=2e-2)
        grads = capture.dense_backward(do, q, k, v, o, lse, D ** -0.5, aux)
        for got, ref in zip(grads, dense_backward(do, q, k, v, o_ref, lse_ref, D ** -0.5)):
            torch.testing.assert_close(got.float(), ref.float(), rtol=5e-2, atol=5e-2 * float(ref.abs().max()))
        out = torch.full((B, Hq, math.ceil(N / bs), math.ceil(N / bs)), float("nan"), device="cuda")
        out.copy_(influence_triton(q, k, v, do, lse, D ** -0.5, bs))
        want = influence_reference(q, k, v, do, lse, D ** -0.5, bs)
        torch.testing.assert_close(out, want, rtol=2e-3, atol=1e-4 * float(want.abs().max()))


class _Rows:
    """Just enough of datasets.Dataset for the profiler (the GPU machine has no `datasets`)."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        return [r[key] for r in self.rows] if isinstance(key, str) else self.rows[key]

    def select_columns(self, cols):
        return _Rows([{c: r[c] for c in cols} for r in self.rows])


@pytest.mark.gpu
def test_gpu_profile_model_fused_equals_reference(tmp_path):
    """The whole path on CUDA in bf16: flash forward/backward, GQA, the kernel, the running sums."""
    model = tiny_model(layers=2, heads=8, kv_heads=2, head_dim=64, vocab=211, seed=9).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    rows = [dict(id=f"g{i}", input_ids=torch.randint(0, 211, (n,), generator=g).tolist(), response_start=n - 40,
                 response_end=n - 8, n_tokens=n) for i, n in enumerate([1000, 1024, 777])]
    common = dict(lengths=[1024], block_size=64, progress=False, plots=False, checkpoint_every=2)
    for backend in ("reference", "triton"):
        P.profile_model(model, _Rows(rows), P.ProfileSettings(backend=backend, **common), tmp_path / backend, calib_hash="x")
    a = load_profile(tmp_path / "reference" / "influence_1024.safetensors")
    b = load_profile(tmp_path / "triton" / "influence_1024.safetensors")
    assert a.samples == b.samples == 3 and b.extra["backend"] == "triton" and b.extra["dtype"] == "bfloat16"
    assert bool(torch.isfinite(b.influence).all()) and b.influence.abs().max() > 0
    torch.testing.assert_close(b.influence, a.influence, rtol=1e-2, atol=1e-2 * float(a.influence.abs().max()))


# ----------------------------------------------------------------------------- resume, selection, errors


def test_interrupted_run_resumes_to_the_same_sums(tmp_path, monkeypatch):
    model = tiny_model(layers=2, heads=4, kv_heads=2, head_dim=8, vocab=61, seed=6)
    ds = _dataset([40, 48, 33, 47, 45], vocab=61)
    settings = P.ProfileSettings(lengths=[48], block_size=16, backend="reference", checkpoint_every=2,
                                 progress=False, plots=False)
    P.profile_model(model, ds, settings, tmp_path / "whole")

    # the 4th sample is in the second chunk of 2: only the first chunk is checkpointed
    calls = interrupt_on_call(monkeypatch, P, "sample_influence", 4)
    with pytest.raises(KeyboardInterrupt):
        P.profile_model(model, ds, settings, tmp_path / "cut")
    ckpt = P.checkpoint_path(tmp_path / "cut", 48)
    assert ckpt.exists() and not (tmp_path / "cut" / "influence_48.safetensors").exists()
    assert P._load_checkpoint(ckpt)[1]["next"] == 2
    calls.clear()
    P.profile_model(model, ds, settings, tmp_path / "cut")
    assert len(calls) == 3 and not ckpt.exists()          # resumed at sample 2 of 5
    whole = load_profile(tmp_path / "whole" / "influence_48.safetensors")
    cut = load_profile(tmp_path / "cut" / "influence_48.safetensors")
    assert cut.samples == whole.samples == 5
    assert torch.equal(cut.influence, whole.influence)
    # a finished length is not recomputed; other settings on the same folder are refused
    calls.clear()
    P.profile_model(model, ds, settings, tmp_path / "cut")
    assert not calls
    with pytest.raises(ProfileError, match="another run"):
        P.profile_model(model, ds, P.ProfileSettings(**{**settings.__dict__, "block_size": 8}), tmp_path / "cut")


def test_sample_selection_counts_skips():
    ds = _dataset([10, 30, 64, 65, 50], target=64)
    sel = P.select_samples(ds, 64, min_fill=0.5)
    assert sel.indices == [2, 4]
    assert sel.skipped["shorter than 0.5 x 64 tokens"] == 2 and sel.skipped["longer than 64 tokens"] == 1
    assert P.select_samples(ds, 128, 0.5).indices == []           # built for another length
    assert P.select_samples(ds, 64, 0.5, max_samples=1).indices == [2]


def test_clear_errors(tmp_path):
    import datasets

    model = tiny_model(layers=1, heads=2, kv_heads=1, head_dim=8, vocab=61)
    s = lambda **kw: P.ProfileSettings(block_size=16, backend="reference", progress=False, plots=False, **kw)  # noqa: E731
    with pytest.raises(ProfileError, match="empty"):
        P.profile_model(model, _dataset([]), s(lengths=[32]), tmp_path)
    with pytest.raises(ProfileError, match="max_position_embeddings"):
        P.profile_model(model, _dataset([30]), s(lengths=[4096]), tmp_path)
    with pytest.raises(ProfileError, match="response span"):
        P.profile_model(model, datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]]}), s(lengths=[32]), tmp_path)
    with pytest.raises(ProfileError, match="no usable samples.*2 shorter"):
        P.profile_model(model, _dataset([10, 12], vocab=61), s(lengths=[64]), tmp_path)
    # a profile from another model
    P.profile_model(model, _dataset([30], vocab=61), s(lengths=[32]), tmp_path / "p")
    from moa_search.plan import ModelShape

    other = ModelShape.from_config(tiny_model(layers=2, heads=2, kv_heads=1, head_dim=8, vocab=61).config)
    with pytest.raises(ProfileError, match="another model"):
        load_profile(tmp_path / "p" / "influence_32.safetensors", expect_model=other)


def test_nonfinite_gradient_names_the_sample(tmp_path):
    model = tiny_model(layers=2, heads=2, kv_heads=1, head_dim=8, vocab=61)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ProfileError, match="sample 's1'.*non-finite"):
        P.profile_model(model, _dataset([20, 30], vocab=61), P.ProfileSettings(
            lengths=[32], block_size=16, backend="reference", min_fill=0.8, progress=False, plots=False), tmp_path)


# ----------------------------------------------------------------------------- CLI and ranks


def _save_fixture(tmp_path, lengths, target):
    model = tiny_model(layers=2, heads=4, kv_heads=2, head_dim=8, vocab=61, seed=7)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(tmp_path / "model")
    ds = _dataset(lengths, vocab=61, target=target)
    extra = {c: [""] * len(ds) for c in ("prompt", "reference", "answer")}
    ds = ds.add_column("depth", [-1.0] * len(ds))
    for c, vals in extra.items():
        ds = ds.add_column(c, vals)
    ds.save_to_disk(str(tmp_path / "calib"))
    return tmp_path / "model", tmp_path / "calib"


def test_cli_profile_writes_profiles_and_plots(tmp_path, capsys):
    from moa_search.cli import main

    model_dir, calib = _save_fixture(tmp_path, [60, 62, 64, 20], target=64)
    args = ["profile", "--model", str(model_dir), "--data", str(calib), "--lengths", "64", "--block-size", "16",
            "-o", str(tmp_path / "out"), "--checkpoint-every", "2"]
    assert main(args) == 0
    prof = load_profile(tmp_path / "out" / "influence_64.safetensors")
    assert prof.samples == 3 and prof.extra["skipped"]["shorter than 0.5 x 64 tokens"] == 1
    assert prof.calibration_hash and prof.influence.shape == (2, 4, 4, 4)
    assert (tmp_path / "out" / "influence_64.png").stat().st_size > 1000
    assert main(args[:5] + ["--lengths", "999999"] + args[7:]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_two_ranks_equal_one_rank_and_resume(tmp_path, monkeypatch):
    """torchrun with 2 gloo ranks on the CPU (issue 8): same profile as one process, and a
    2-rank run resumes from a checkpoint left by an interrupted run."""
    from moa_search.cli import main

    model_dir, calib = _save_fixture(tmp_path, [60, 62, 64, 50, 58], target=64)
    base = ["profile", "--model", str(model_dir), "--data", str(calib), "--lengths", "64", "--block-size", "16",
            "--checkpoint-every", "1", "--no-plots", "--device", "cpu"]

    def torchrun(out, port):
        return run_cli(base + ["-o", str(out)], ranks=2, port=port, timeout=120)

    torchrun(tmp_path / "two", 29517)
    assert main(base + ["-o", str(tmp_path / "one")]) == 0
    one = load_profile(Path(tmp_path / "one" / "influence_64.safetensors"))
    two = load_profile(Path(tmp_path / "two" / "influence_64.safetensors"))
    assert two.samples == one.samples == 5 and two.extra["world_size"] == 2
    torch.testing.assert_close(two.influence, one.influence, rtol=1e-12, atol=1e-15)

    # interrupted after 2 of 5 samples (checkpoint every sample), then resumed on 2 ranks
    interrupt_on_call(monkeypatch, P, "sample_influence", 3)
    assert main(base + ["-o", str(tmp_path / "resumed")]) == 130
    assert P._load_checkpoint(P.checkpoint_path(tmp_path / "resumed", 64))[1]["next"] == 2
    res = torchrun(tmp_path / "resumed", 29518)
    assert "resuming after sample 2 of 5" in res.stderr
    resumed = load_profile(Path(tmp_path / "resumed" / "influence_64.safetensors"))
    assert resumed.samples == 5
    torch.testing.assert_close(resumed.influence, one.influence, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device_map", ["auto", '{"": "cpu"}'])
def test_device_map_profile_equals_single_device(tmp_path, capsys, device_map):
    """--device-map loads through accelerate (its hooks around every layer); the sums are the
    same as with --device. On a GPU machine, test_gpu_split_device_map_profile_and_plan puts layers on two devices."""
    pytest.importorskip("accelerate")
    from moa_search.cli import main

    model_dir, calib = _save_fixture(tmp_path, [60, 62, 64], target=64)
    common = ["profile", "--model", str(model_dir), "--data", str(calib), "--lengths", "64", "--block-size", "16",
              "--no-plots", "--dtype", "float32"]
    assert main(common + ["-o", str(tmp_path / "one"), "--device", "cpu"]) == 0
    assert main(common + ["-o", str(tmp_path / "map"), "--device-map", device_map]) == 0
    a = load_profile(tmp_path / "one" / "influence_64.safetensors")
    b = load_profile(tmp_path / "map" / "influence_64.safetensors")
    assert a.samples == b.samples == 3
    torch.testing.assert_close(b.influence, a.influence, rtol=1e-6, atol=0)
    assert main(common + ["-o", str(tmp_path / "x"), "--device", "cpu", "--device-map", "auto"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(common + ["-o", str(tmp_path / "x"), "--device-map", "{bad json"]) == 2
    assert "expected auto" in capsys.readouterr().err


def test_device_map_without_accelerate_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    from moa_search.models import load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(MoaError, match="pip install accelerate"):
        load_model(str(tmp_path), device_map="auto")


def test_device_map_under_torchrun_is_refused(monkeypatch, tmp_path):
    """Under torchrun each rank holds a whole model; a device_map there would shard it again."""
    from moa_search.models import load_model

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MoaError, match="under torchrun each rank holds a whole model"):
        load_model(str(tmp_path), device_map="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("second", ["cpu", 1])
def test_gpu_split_device_map_profile_and_plan(tmp_path, second):
    """Layer 0 on GPU 0, layer 1 on `second`: offloaded to the CPU by accelerate (its weights
    sit on "meta" and come to the GPU when it runs), or resident on GPU 1 (needs 2 GPUs). The
    profile equals the one-device profile, and a plan applied to the split model gives the
    logits of the plan on one device."""
    pytest.importorskip("accelerate")
    if second == 1 and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from moa_search import apply_plan
    from moa_search.models import load_model

    from helpers import random_plan

    model_dir, calib = _save_fixture(tmp_path, [60, 62, 64], target=64)
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": second,
             "model.norm": second, "lm_head": second}
    import datasets

    ds = datasets.load_from_disk(str(calib))
    common = dict(lengths=[64], block_size=16, progress=False, plots=False)
    one, _ = load_model(str(model_dir), "cuda", "float32", tokenizer=False)
    two, _ = load_model(str(model_dir), None, "float32", split, tokenizer=False)
    want = {"cuda:0", "meta"} if second == "cpu" else {"cuda:0", "cuda:1"}
    assert {str(p.device) for p in two.parameters()} == want
    for name, m in (("one", one), ("two", two)):
        m.requires_grad_(False)
        P.profile_model(m, ds, P.ProfileSettings(backend="auto", **common), tmp_path / name, calib_hash="x")
    a = load_profile(tmp_path / "one" / "influence_64.safetensors")
    b = load_profile(tmp_path / "two" / "influence_64.safetensors")
    # float32 on the GPU runs tf32 matrix products, on the CPU full float32: 1e-2
    torch.testing.assert_close(b.influence, a.influence, rtol=1e-2, atol=1e-2 * float(a.influence.abs().max()))

    plan = random_plan(one, seed=3, max_alpha=20)
    ids = torch.randint(0, 61, (2, 64), generator=torch.Generator().manual_seed(0))
    apply_plan(one, plan)
    apply_plan(two, plan)
    with torch.no_grad():
        ref = one(ids.cuda()).logits.float().cpu()
        got = two(ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.gpu
def test_gpu_nccl_two_ranks_equal_one_rank(tmp_path):
    """torchrun on 2 GPUs (NCCL): the profile equals the one-GPU profile on the same samples."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    model_dir, calib = _save_fixture(tmp_path, [60, 62, 64, 50, 58], target=64)
    base = ["profile", "--model", str(model_dir), "--data", str(calib), "--lengths", "64", "--block-size", "16",
            "--checkpoint-every", "1", "--no-plots", "--dtype", "float32"]
    run_cli(base + ["-o", str(tmp_path / "two")], ranks=2, port=29527)
    run_cli(base + ["-o", str(tmp_path / "one")], cuda_visible="0")
    one = load_profile(tmp_path / "one" / "influence_64.safetensors")
    two = load_profile(tmp_path / "two" / "influence_64.safetensors")
    assert two.samples == one.samples == 5 and two.extra["world_size"] == 2
    torch.testing.assert_close(two.influence, one.influence, rtol=1e-5, atol=1e-7 * float(one.influence.abs().max()))
