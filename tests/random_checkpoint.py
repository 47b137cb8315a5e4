"""A big random Llama checkpoint written layer by layer (never a whole model in RAM): one
safetensors file per layer and a ``model.safetensors.index.json``, as sharded checkpoints are.

``python tests/random_checkpoint.py DEST`` writes the ~1B-parameter shape the memory test uses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# ~1.0B parameters, 2 GB of bf16: few, wide layers (an MLP 4x the hidden size)
BIG = dict(
    vocab_size=8192,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def write_random_llama(dest: Path, seed: int = 0, **shape: int) -> Path:
    """A random bf16 Llama of ``shape`` (default :data:`BIG`) in ``dest``; returns ``dest``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**BIG, **shape}, dtype="bfloat16")
    dest.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(dest)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape_ in shapes.items():
        part = name.split(".")
        key = ".".join(part[:3]) if part[1] == "layers" else "rest"
        groups.setdefault(key, {})[name] = shape_
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, tensors in enumerate(groups.values()):
        out = {}
        for name, s in tensors.items():
            if name.endswith("norm.weight"):
                out[name] = torch.ones(s, dtype=torch.bfloat16)
            else:
                std = 1.0 if "embed" in name else 0.02
                out[name] = (torch.randn(s, generator=g) * std).to(torch.bfloat16)
        fname = f"model-{i:05d}.safetensors"
        save_file(out, dest / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, fname))
        del out
    index = {"metadata": {}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


if __name__ == "__main__":
    write_random_llama(Path(sys.argv[1]))
