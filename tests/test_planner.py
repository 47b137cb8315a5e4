"""The memory planner: monotone estimates, a plan that fits, and actionable refusals."""

import pytest
from transformers import LlamaConfig

from distill.config import job_from_dict
from distill.errors import DistillError
from distill.student.planner import apply, count_params, estimate, plan

CFG = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


def test_param_count_is_exact():
    # embeddings (tied) + 12 x (attention + MLP + 2 norms) + final norm
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576
    assert count_params(CFG) == 49152 * 576 + 12 * per_layer + 576


def test_estimate_grows_with_tokens_and_levers_shrink_it():
    p = count_params(CFG)
    small = estimate(CFG, p, 1, 256, checkpointing=False)
    big = estimate(CFG, p, 8, 256, checkpointing=False)
    assert big.parts["activations"] > 7 * small.parts["activations"] * 0.9
    assert big.parts["weights"] == small.parts["weights"] == 4 * p
    ckpt = estimate(CFG, p, 8, 256, checkpointing=True)
    assert ckpt.parts["activations"] < big.parts["activations"] / 2
    off = estimate(CFG, p, 8, 256, checkpointing=False, offload=True)
    assert off.parts["optimizer"] == 0 and big.parts["optimizer"] == 8 * p
    eight = estimate(CFG, p, 8, 256, checkpointing=False, optimizer="adamw8bit")
    assert eight.parts["optimizer"] == 2 * p
    chunk = estimate(CFG, p, 8, 256, checkpointing=False, loss_chunk=128)
    assert chunk.parts["loss_chunk"] < big.parts["loss_chunk"]


def job(**train):
    return job_from_dict({"data": {"max_length": 384}, "train": {"batch_size": 8, **train}})


def test_plan_keeps_the_effective_batch_and_fits():
    j = job()
    p = plan(j, 4 * 2**30, config=CFG)
    assert p.estimate.total <= 0.9 * 4 * 2**30
    assert p.estimate.micro_batch * p.grad_accum == 8
    roomy = plan(j, 64 * 2**30, config=CFG)
    assert roomy.estimate.micro_batch == 8 and roomy.grad_accum == 1
    assert not roomy.estimate.checkpointing
    j = apply(j, p)
    assert (j.train.batch_size, j.train.grad_accum) == (p.estimate.micro_batch, p.grad_accum)


def test_plan_that_cannot_fit_names_the_levers():
    with pytest.raises(DistillError) as e:
        plan(job(), 2**29, config=CFG)
    msg = str(e.value)
    assert "cannot fit 0.50 GiB" in msg
    assert "train.optimizer_offload" in msg and "train.loss_chunk" in msg


def test_a_student_with_its_own_tokenizer_is_planned_at_its_vocabulary(tiny_teacher_dir, tmp_path):
    """student.tokenizer (#24): the planned student is the one teacher-layers builds, at the
    student's vocabulary (exact parameter count), and the loss chunk scales with it."""
    from helpers import bpe_tokenizer

    from distill import models
    from distill.student.init import init_from_teacher_layers
    from distill.student.planner import student_config

    bpe = tmp_path / "bpe"
    bpe_tokenizer().save_pretrained(bpe)
    raw = {
        "teacher": {"model": str(tiny_teacher_dir)},
        "student": {"init": "teacher-layers", "layers": 2},
        "data": {"train": "unused.jsonl"},
    }
    same = job_from_dict(raw)
    other = job_from_dict({**raw, "student": {**raw["student"], "tokenizer": str(bpe)}})
    built = init_from_teacher_layers(tiny_teacher_dir, 2, tmp_path / "s", tokenizer_dir=bpe)
    model = models.load_model(built, "float32", "cpu")
    cfg = student_config(other)
    assert cfg.vocab_size == 2000 == models.vocab_size(model)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert count_params(cfg) < count_params(student_config(same))
    kw = dict(checkpointing=False, loss_chunk=64)
    ours = estimate(cfg, count_params(cfg), 1, 64, **kw).parts["loss_chunk"]
    teacher_vocab = estimate(student_config(same), 1, 1, 64, **kw).parts["loss_chunk"]
    assert ours * 49152 == teacher_vocab * 2000
