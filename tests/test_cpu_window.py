"""kernels/cpu_window.py (the CPU eval path) equals the reference on random inputs."""
import pytest
import torch

from moa_search.kernels.cpu_window import window_attention_cpu
from moa_search.kernels.reference import sparse_attention_reference


@pytest.mark.parametrize("nq,nk,pad_left,pad_right", [(300, 300, 0, 0), (300, 300, 17, 0), (1, 300, 5, 0),
                                                      (40, 300, 0, 9), (257, 257, 0, 0)])
def test_matches_reference(nq, nk, pad_left, pad_right):
    torch.manual_seed(nq + nk + pad_left)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, Hq, nq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, nk, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, nk, D, dtype=torch.float64)
    span = torch.tensor([[1, 7, 64, 1000], [300, 33, 2, 129]])
    start = torch.tensor([0, pad_left])
    end = torch.tensor([nk, nk - pad_right])
    sink = 5
    want = sparse_attention_reference(q, k, v, sink, span, start, end, 0.3)
    got = window_attention_cpu(q, k, v, sink, span, start, end, 0.3, chunk=64)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)
