"""Influence profiling (DESIGN.md section 4): how much each attention entry matters to the loss.

    reference.py  the math in PyTorch (chunked; CPU and oracle): influence, dense attention fwd/bwd
    capture.py    the autograd Function plugged into the "moa" attention seam (the Runtime's capture, moa_search.hf_adapter.profiling)
    profile.py    samples -> running sums -> profile files; checkpoints, resume, torchrun ranks
    io.py         the profile file format (safetensors, one file per length)
    plots.py      per-head influence by distance (PNG)
    run.py        `moa profile`
The fused Triton kernel lives in kernels/influence.py (moa_search.kernels.influence).
"""
