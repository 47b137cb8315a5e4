"""What the GPU check runs on, made on the spot: nothing but small tokenizer files can travel
to the device machine, so the models are random weights in real models' shapes.

- :func:`tokenizer_dir`: SmolLM2's tokenizer where it was carried (``make gpu-wheels`` copies
  it from the local conversion cache, 3.5 MB), else :func:`synthetic_tokenizer`, a byte-level
  tokenizer (256 byte tokens + SmolLM2's special tokens and chat template) that needs no file;
- :data:`SHAPES`: SmolLM2-135M's config and a Llama-3.2-1B-shaped config (~1.24B parameters),
  each with a tiny stand-in for the CPU dry run;
- :func:`build_model` (in memory, on the device) and :func:`save_model` (a Hugging Face
  directory; large ones written layer by layer, tests/random_checkpoint.py);
- :func:`demo_samples`: the demo dataset tokenised, repeated to make the pass long enough.

torch and transformers are imported inside the functions (check.py's orchestrator stays light).
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo" / "train.jsonl"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
# SmolLM2-Instruct's template (the conversion cache's chat_template.jinja), so a synthetic
# tokenizer renders the demo chats as the real one does
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_LLAMA = dict(
    model_type="llama", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2
)
# name -> (full shape, tiny stand-in for the CPU dry run)
SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct)'s config.json: 134.5M parameters
    "smollm2-135m": (
        dict(
            _LLAMA,
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
        ),
        dict(_LLAMA, vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2),
    ),
    # meta-llama/Llama-3.2-1B's shape (random weights, SmolLM2's token ids): 1.24B parameters
    "llama-1b": (
        dict(
            _LLAMA,
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
        ),
        dict(_LLAMA, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3),
    ),
}
_TINY_HEADS = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def shape(name: str, tiny: bool) -> dict[str, Any]:
    """The config fields of model ``name`` (its tiny stand-in with ``tiny``)."""
    full, small = SHAPES[name]
    return {**small, **_TINY_HEADS} if tiny else dict(full)


def llama_config(fields: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"})


def synthetic_tokenizer(dest: Path) -> Path:
    """A byte-level tokenizer (no merges: one token per UTF-8 byte, ids 0-255) with SmolLM2's
    special tokens (ids 256-258) and chat template, saved in ``dest``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    dest.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(dest)
    return dest


def tokenizer_dir(carried: Path | None, work: Path) -> tuple[Path, str]:
    """(a tokenizer directory, what it is): the carried SmolLM2 tokenizer if given and
    present, else a synthetic byte-level one written under ``work``."""
    if carried is not None and (carried / "tokenizer.json").is_file():
        return carried, f"SmolLM2-135M-Instruct's tokenizer (carried: {carried.name}/)"
    return synthetic_tokenizer(work / "tokenizer"), "synthetic byte-level (259 ids)"


def copy_tokenizer(src: Path, dest: Path) -> None:
    """The tokenizer files of ``src`` into ``dest`` (a model directory)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)


def build_model(
    fields: dict[str, Any], device: str, dtype: str, seed: int = 0, logit_std: float = 2.0
) -> Any:
    """A random Llama of ``fields`` built directly on ``device`` in ``dtype`` (eval mode).

    Its embedding (tied to the head) is scaled so that the logits over the vocab have a std of
    ``logit_std`` (measured on random tokens): a spread but not flat next-token distribution
    whose top-k log-probs lie inside the default codec's log8 range [-20, 0]. (Random init
    gives either a near-uniform one or, where the embedding dominates the residual stream, the
    input token's own logit far above the rest, with top-k log-probs the codec clamps.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.models import DTYPES

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(fields), dtype=DTYPES[dtype])
    model.eval()
    emb = model.get_input_embeddings().weight
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, fields["vocab_size"], (4, 64), generator=g).to(device)
    with torch.no_grad():
        emb.normal_(0.0, 1.0 / math.sqrt(fields["hidden_size"]))
        for _ in range(2):  # logits scale with the embedding (the final norm undoes the rest)
            std = model(input_ids=ids).logits.float().std(-1).mean()
            emb.mul_(logit_std / float(std))
    return model


def save_model(fields: dict[str, Any], dest: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A random bf16 Llama of ``fields`` as a sharded safetensors checkpoint (one file per
    layer, never the whole model in memory) with ``tokenizer``'s files."""
    spec = importlib.util.spec_from_file_location(
        "random_checkpoint", ROOT / "tests" / "random_checkpoint.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_random_llama(
        dest, seed=seed, **{k: v for k, v in fields.items() if k != "model_type"}
    )
    copy_tokenizer(tokenizer, dest)
    return dest


def demo_samples(tokenizer: Any, n: int, max_length: int, repeat: int = 1) -> list[Any]:
    """The first ``n`` valid demo training samples (0: all), ``repeat`` times (keys made
    unique)."""
    import dataclasses

    from distill.data.dataset import tokenize_file

    # a line left with no assistant token by the truncation is skipped (as data.on_invalid =
    # "skip" would), not an error: the byte-level tokenizer's samples are ~4x longer
    base = tokenize_file(DEMO, tokenizer, max_length, "right", max_samples=n, on_invalid="skip")
    return [
        dataclasses.replace(s, key=f"{s.key}-r{r}") if r else s
        for r in range(max(1, repeat))
        for s in base
    ]
