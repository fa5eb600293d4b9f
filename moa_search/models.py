"""Loading a model (and its tokenizer) from a checkpoint folder: the one place that knows how.

Every step (calibrate, profile, search, eval, generate) loads through `load_model`, so a
missing folder, a folder that is not a checkpoint, and --device-map mistakes give the same
one-line errors everywhere, and never reach the Hugging Face Hub: every path here is local.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .errors import MoaError

DEVICE_MAP_HELP = ("shard the model over this host's GPUs with accelerate (layers on different devices): "
                   "auto, balanced, sequential, or a JSON file / string {module name: device}; instead of --device")


def embedded_model_dir() -> Path:
    """The small Llama checkpoint shipped inside the package (see demo_model/README.md)."""
    path = Path(__file__).resolve().parent / "demo_model"
    if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: the embedded demo model is missing (config.json / model.safetensors); "
                                "reinstall moa-search or pass --model MODEL_DIR")
    return path


def add_device_map_argument(p) -> None:
    p.add_argument("--device-map", default=None, metavar="MAP", help=DEVICE_MAP_HELP)


def parse_device_map(value):
    """--device-map value -> what from_pretrained takes (a strategy name or {module: device})."""
    if value is None or value in ("auto", "balanced", "balanced_low_0", "sequential"):
        return value
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        raise MoaError(f"--device-map {value!r}: expected auto, balanced, sequential, or JSON "
                       '{"model.layers.0": 0, ...} (inline or in a file)') from None
    if not isinstance(mapping, dict):
        raise MoaError(f"--device-map {value!r}: the JSON must be an object {{module name: device}}")
    return mapping


def check_model_dir(path) -> Path:
    """The checkpoint folder, or a MoaError saying what is wrong with it (never a Hub lookup)."""
    p = Path(path)
    if not p.exists():
        raise MoaError(f"{path}: no such model directory (models load from a local folder; there is no Hub access)")
    if not p.is_dir():
        raise MoaError(f"{path}: not a directory (expected a checkpoint folder with config.json)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise MoaError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        obj = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoaError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or "model_type" not in obj:
        raise MoaError(f"{cfg}: no model_type field (not a transformers model config)")
    return p


def load_model(path, device: str | None = None, dtype: str = "auto", device_map=None, tokenizer: bool = True):
    """(model, tokenizer) from a checkpoint directory, in eval mode.

    device: one device for the whole model (default: this rank's GPU if there is one). device_map: a
    strategy ("auto", ...) or {module name: device} for accelerate to place the layers
    (one of the two). The plan's rules and the profiler follow each layer's own device.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa_search import distributed

    if device_map is not None:   # the flags first: they are wrong whatever the folder holds
        if device is not None:
            raise MoaError("give --device or --device-map, not both")
        if distributed.launched():
            raise MoaError("--device-map shards one model over this host's GPUs; under torchrun each rank "
                           "holds a whole model on its own GPU (use one or the other)")
        if importlib.util.find_spec("accelerate") is None:  # transformers places the layers with it
            raise MoaError("--device-map needs the accelerate package: pip install accelerate")
    path = str(check_model_dir(path))
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map,
                                                     local_files_only=True).eval()
    else:
        device = device or distributed.default_device()   # cuda:LOCAL_RANK under torchrun
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True).to(device).eval()
    if not tokenizer:
        return model, None
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
