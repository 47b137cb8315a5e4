"""Packed batches: same hidden states and the same targets as unpacked ones, less padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.errors import DistillError
from distill.format.shards import TargetSample
from distill.student.loader import collate
from distill.student.packing import PAD_SEQ, PackedBatch, block_causal_mask, pack_collate, pack_rows

VOCAB, K = 100, 4


def sample(key: str, n: int, rng: np.random.Generator) -> TargetSample:
    ids = rng.integers(1, VOCAB, n).astype(np.uint16)
    loss = np.zeros(n, np.uint8)
    loss[rng.integers(1, max(2, n)) :] = 1  # a prompt, then the assistant turn
    loss[0] = 0
    m = int(loss[1:].sum())
    lp = np.log(rng.dirichlet(np.ones(K + 1), m)[:, :K]).astype(np.float16)
    return TargetSample(key, ids, loss, rng.integers(0, VOCAB, (m, K)).astype(np.uint16), lp)


def samples(lengths: list[int], seed: int = 0) -> list[TargetSample]:
    rng = np.random.default_rng(seed)
    return [sample(f"s{i:02d}", n, rng) for i, n in enumerate(lengths)]


LENGTHS = [5, 17, 3, 9, 30, 2, 11, 7, 1, 14]


def tiny_llama(impl: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=impl,
    )
    return LlamaForCausalLM(cfg).eval()


def test_rows_keep_order_and_isolate_long_samples() -> None:
    assert pack_rows([5, 17, 3, 9, 30, 2], 20) == [[0], [1, 2], [3], [4], [5]]
    assert pack_rows([3, 3, 3], 6) == [[0, 1], [2]]
    with pytest.raises(DistillError, match="row_tokens"):
        pack_rows([3], 0)
    with pytest.raises(DistillError):
        pack_collate([], 8)


def test_targets_line_up_with_unpacked_collate() -> None:
    ss = samples(LENGTHS)
    ref, packed = collate(ss), pack_collate(ss, row_tokens=24)
    assert packed.keys == ref.keys
    assert torch.equal(packed.t_ids, ref.t_ids)
    assert torch.equal(packed.t_logprobs, ref.t_logprobs)
    assert torch.equal(packed.labels, ref.labels)
    # The rows picked by target_mask hold the same tokens, in the same order, as unpacked.
    assert torch.equal(packed.input_ids[packed.target_mask], ref.input_ids[ref.target_mask])
    nxt = torch.roll(packed.target_mask, 1, dims=1)  # positions t+1 of every target
    assert torch.equal(packed.input_ids[nxt], packed.labels)
    assert packed.tokens == ref.tokens == sum(LENGTHS)
    assert torch.equal(packed.token_mask.sum(1), (packed.seq_ids != PAD_SEQ).sum(1))


def test_fewer_padded_tokens() -> None:
    ss = samples(LENGTHS)
    ref, packed = collate(ss), pack_collate(ss, row_tokens=32)
    ref_pad = ref.attention_mask.numel() - ref.tokens
    assert packed.padding < ref_pad
    assert packed.input_ids.shape[0] < ref.input_ids.shape[0]
    assert packed.input_ids.shape[1] <= 32


def test_sample_longer_than_row_gets_own_row() -> None:
    ss = samples([4, 20, 3, 3])
    packed = pack_collate(ss, row_tokens=8)
    assert packed.input_ids.shape == (3, 20)
    assert packed.seq_ids[1].tolist() == [0] * 20
    assert packed.seq_ids[2, :6].tolist() == [0, 0, 0, 1, 1, 1]
    assert packed.position_ids[2, :6].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(packed.labels, collate(ss).labels)


def test_mask_blocks_other_samples_and_padding() -> None:
    packed = pack_collate(samples([3, 2, 1]), row_tokens=8)  # one row: 3 + 2 + 1, no pad
    packed2 = pack_collate(samples([3, 6]), row_tokens=6)  # rows: [3 + pad], [6]
    allowed = packed.attention_mask[0, 0] == 0
    want = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in ((0, 3), (3, 5), (5, 6)):
        want[a:b, a:b] = torch.tril(torch.ones(b - a, b - a, dtype=torch.bool))
    assert torch.equal(allowed, want)
    allowed2 = packed2.attention_mask[0, 0] == 0
    assert not allowed2[:3, 3:].any()  # real tokens never see padding
    assert torch.equal(allowed2[3:, :], torch.eye(6, dtype=torch.bool)[3:])  # pad: self only
    assert packed2.attention_mask.dtype == torch.float32
    moved = packed2.to("cpu")
    assert isinstance(moved, PackedBatch)
    assert torch.equal(moved.attention_mask, block_causal_mask(packed2.seq_ids))


@pytest.mark.parametrize(
    ("impl", "mode"), [("eager", "mask4d"), ("sdpa", "mask4d"), ("sdpa", "position_ids")]
)
def test_hidden_states_match_each_sample_alone(impl: str, mode: str) -> None:
    model = tiny_llama(impl)
    ss = samples(LENGTHS, seed=1)
    packed = pack_collate(ss, row_tokens=24)
    mask = packed.attention_mask if mode == "mask4d" else None
    with torch.no_grad():
        hidden = model.model(
            input_ids=packed.input_ids,
            attention_mask=mask,
            position_ids=packed.position_ids,
            use_cache=False,
        ).last_hidden_state
        ref = collate(ss)
        ref_hidden = model.model(
            input_ids=ref.input_ids, attention_mask=ref.attention_mask, use_cache=False
        ).last_hidden_state
        alone = [
            model.model(
                input_ids=torch.from_numpy(s.input_ids.astype(np.int64))[None], use_cache=False
            ).last_hidden_state[0]
            for s in ss
        ]
    assert torch.isfinite(hidden).all()
    k = 0
    for r in range(packed.input_ids.shape[0]):
        for j in range(int(packed.seq_ids[r].max()) + 1):
            got = hidden[r][packed.seq_ids[r] == j]
            torch.testing.assert_close(got, alone[k], atol=1e-5, rtol=1e-5)
            k += 1
    assert k == len(ss)
    torch.testing.assert_close(
        hidden[packed.target_mask], ref_hidden[ref.target_mask], atol=1e-5, rtol=1e-5
    )
