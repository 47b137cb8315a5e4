"""On a CUDA GPU (``pytest -m cuda``; skipped without one): the fused LM-head KD loss against the
dense reference at real vocab sizes, the teacher pass against the CPU's targets, the layered
pass against the resident one, int8/nf4 teachers against bf16, and a short bf16 training run
with gradient checkpointing. bench/gpu/check.py runs these on a lent GPU machine (README "GPU
check"); what they measure is appended to $DISTILL_GPU_CHECK_RECORD for its summary.

Tolerances (stated here, checked below):

- fused loss, fp32 inputs, against float64 on the same inputs: loss and per-term means 1e-4
  relative, gradients 2e-3 of their largest entry; bf16 inputs (upcast inside): the same against
  float64 on the *rounded* inputs, gradients (returned in bf16) 2e-2;
- teacher targets on CUDA against the CPU's (top-16, same fp32 weights): float32 the same ids
  up to near-ties (1e-3) and |log-prob diff| <= 2e-3; bfloat16 99% of the rows agreeing up to
  near-ties at 0.5 and 99% of the log-probs within 0.5 (bench/teacher_pass.py's bf16 bound);
- layered = resident on CUDA: the same ids, log-probs within 1e-4 (as on the CPU);
- int8 / nf4 against bf16: the mean KL(p_bf16 || p_quant) over target positions <= 0.05 / 0.5
  nats (a CPU simulation of the weight rounding gives 1e-3 / 0.17 on this model; unrelated
  layer weights give 2.5);
- training: finite losses, the decoder's matmuls in bf16, checkpointed layers.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import models
from distill.config import LossWeights
from distill.format.spec import TargetSpec
from distill.student.kd_kernel import FusedLMHeadLoss
from distill.student.losses import chunked_distill_loss
from distill.teacher.extract import compute_targets
from distill.teacher.layered import LayeredTeacher

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "gpu"))

import synth  # noqa: E402
from test_kd_kernel import CASES, dense_terms, run  # noqa: E402
from test_layered import assert_same_targets, random_samples, save_random  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not CUDA,
        reason=f"needs a CUDA device (torch {torch.__version__}, CUDA build "
        f"{torch.version.cuda or 'none'}, sees none): bench/gpu/check.py runs these on a GPU",
    ),
]


def record(test: str, **values: object) -> None:
    """Append a measurement for bench/gpu/check.py's summary (no-op outside the check)."""
    path = os.environ.get("DISTILL_GPU_CHECK_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **values}, default=float) + "\n")


def llama(
    vocab: int, hidden: int, layers: int, init: float = 0.02, seed: int = 0
) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=init,
    )
    return LlamaForCausalLM(cfg).eval()


# --- the fused LM-head KD loss ----------------------------------------------------------------


def kd_inputs(vocab: int, n: int = 96, hidden: int = 128, k: int = 16, seed: int = 0):
    """float64 (hidden, weight, ids, log-probs, labels) on the GPU: distinct ids per row, 40-99%
    of the teacher's mass on them, half the labels inside the stored ids."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden) * 4
    ids = torch.rand(n, vocab, generator=g).argsort(-1)[:, :k]
    mass = 0.4 + 0.59 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    lps = (torch.randn(n, k, generator=g, dtype=torch.float64) * 2).log_softmax(-1) + mass.log()
    inside = torch.rand(n, generator=g) < 0.5
    labels = torch.where(inside, ids[:, 0], torch.randint(0, vocab, (n,), generator=g))
    return tuple(t.cuda() for t in (h, w, ids, lps, labels))


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("vocab", [49152, 151936])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_loss_on_cuda_matches_the_dense_reference(vocab, dtype, tau):
    lw = LossWeights(**CASES["all"], temperature=tau)
    h64, w64, ids, lps64, labels = kd_inputs(vocab)
    dt = getattr(torch, dtype)
    h, w = h64.to(dt), w64.to(dt)  # bf16: as autocast hands the hidden states over
    lps = lps64.float()  # as the shards decode
    total, means, gh, gw = run(
        FusedLMHeadLoss, h.requires_grad_(), w.requires_grad_(), ids, lps, labels, lw, 32
    )
    assert gh.dtype == dt and gw.dtype == dt and gh.is_cuda
    # the dense float64 reference on the same (rounded) inputs, on the CPU
    h2 = h.detach().double().cpu().requires_grad_()
    w2 = w.detach().double().cpu().requires_grad_()
    ids, lps, labels = ids.cpu(), lps.double().cpu(), labels.cpu()
    terms = dense_terms(h2 @ w2.T, ids, lps, labels, tau, lw.jsd_beta, lw.bild_top, True)
    coefs = lw.coefficients()
    ref = sum(c * terms[name] for name, c in coefs.items()).mean()
    (3.0 * ref).backward()
    ref = ref.detach()
    ref_means = torch.stack([terms[name].mean() for name in coefs]).detach()
    d_loss = abs(total.item() - ref.item()) / abs(ref.item())
    means = means.double().cpu()
    d_means = float(((means - ref_means).abs() / ref_means.abs().clamp(min=1e-6)).max())
    d_gh, d_gw = rel_max(gh, h2.grad), rel_max(gw, w2.grad)
    grad_tol = 2e-3 if dtype == "float32" else 2e-2
    record(
        f"fused loss V={vocab} {dtype} tau={tau}",
        loss_rel_diff=d_loss,
        grad_h_rel=d_gh,
        grad_w_rel=d_gw,
        tolerance=f"1e-4 / {grad_tol:g}",
    )
    assert d_loss <= 1e-4 and d_means <= 1e-4
    assert d_gh <= grad_tol and d_gw <= grad_tol


def test_fused_loss_cuda_peak_memory_is_one_chunk_buffer_and_the_gradients():
    """The fused path's step adds grad_W, grad_h and ONE [chunk, V] fp32 buffer (+ cuBLAS
    workspace), never a [rows, V] one: 4,096 rows x V 151,936 would be 2.5 GB of logits."""
    n, hidden, vocab, chunk = 4096, 256, 151936, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / 16).requires_grad_()
    ids = torch.randint(0, vocab, (n, 16), device="cuda", generator=g)
    lps = torch.full((n, 16), -4.0, device="cuda")
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    lw = LossWeights(forward_kl=0.9, ce=0.1)
    chunked_distill_loss(h[:8], w, ids[:8], lps[:8], labels[:8], lw, chunk)[0].backward()
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    total, _ = chunked_distill_loss(h, w, ids, lps, labels, lw, chunk)
    assert total.grad_fn.name() == "FusedLMHeadLossBackward"
    total.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads, buf = (vocab + n) * hidden * 4, chunk * vocab * 4
    bound = grads + 2 * buf + 64 * 2**20
    record("fused loss peak memory", peak_mib=peak / 2**20, bound_mib=bound / 2**20)
    assert peak <= bound, (peak, bound)


# --- the teacher pass ---------------------------------------------------------------------------


def compare_targets(a, b, tol):
    """(share of rows whose top-k agree up to near-ties within ``tol``, |log-prob diffs| on the
    shared ids) of two target lists of the same samples."""
    agree, diffs = [], []
    for x, y in zip(a, b, strict=True):
        assert x.key == y.key
        for r in range(len(x.target_ids)):
            xi, yi = x.target_ids[r], y.target_ids[r]
            xl, yl = x.target_logprobs[r], y.target_logprobs[r]
            _, ix, iy = np.intersect1d(xi, yi, return_indices=True)
            diffs.append(np.abs(xl[ix] - yl[iy]))
            only_x = np.setdiff1d(np.arange(len(xi)), ix)
            only_y = np.setdiff1d(np.arange(len(yi)), iy)
            agree.append(
                bool((xl[only_x] - xl.min() <= tol).all() and (yl[only_y] - yl.min() <= tol).all())
            )
    return float(np.mean(agree)), np.concatenate(diffs)


def test_teacher_targets_on_cuda_match_the_cpu():
    model = llama(49152, 128, 4)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.3)
    samples = random_samples(24, 1, vocab=49152, max_len=120)
    spec = TargetSpec("topk", 16)
    want = compute_targets(model, samples, spec, 1024, 64)
    for dtype, tol in (("float32", 2e-3), ("bfloat16", 0.5)):
        gpu = copy.deepcopy(model).to("cuda", models.DTYPES[dtype])
        got = compute_targets(gpu, samples, spec, 1024, 64)
        agree, d = compare_targets(want, got, 1e-3 if dtype == "float32" else tol)
        record(
            f"teacher targets CUDA {dtype} vs CPU float32",
            rows_agreeing=agree,
            logprob_diff_max=float(d.max()),
            logprob_diff_mean=float(d.mean()),
            tolerance=tol,
        )
        if dtype == "float32":
            assert agree == 1.0 and float(d.max()) <= tol
        else:
            assert agree >= 0.99 and float((d <= tol).mean()) >= 0.99
        del gpu
        torch.cuda.empty_cache()


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama"])
def test_layered_equals_resident_on_cuda(kind, tmp_path):
    path = save_random(kind, tmp_path / kind)
    spec = TargetSpec("topk", 8)
    groups = [random_samples(7, 1), random_samples(5, 2)]
    resident = models.load_model(path, "float32", "cuda")
    want = [compute_targets(resident, g, spec, 160, 24, seed=3) for g in groups]
    layered = LayeredTeacher(path, "float32", "cuda")
    got = layered.compute_groups(groups, spec, 160, 24, seed=3)
    for w, g in zip(want, got, strict=True):
        assert_same_targets(w, g, atol=1e-4)
    assert layered.stats.chunks == 1 and layered.stats.weight_bytes > 0


# --- int8 / nf4 -------------------------------------------------------------------------------

BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(
    CUDA and not BNB,
    reason="bitsandbytes is not installed (on a lent GPU machine: make gpu-wheels carries it)",
)
@pytest.mark.parametrize(("quantize", "max_kl"), [("int8", 0.05), ("nf4", 0.5)])
def test_quantized_teacher_stays_within_a_stated_kl_of_bf16(quantize, max_kl, tmp_path):
    """Its layers' weights matter (init 0.05, embedding 0.1: a spread next-token distribution),
    so quantization shows; unrelated weights give a KL of ~2.5 nats."""
    model = llama(4096, 256, 4, init=0.05)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path / "m")
    ref = models.load_model(tmp_path / "m", "bfloat16", "cuda").eval()
    q = models.load_model(tmp_path / "m", "bfloat16", "cuda", quantize).eval()
    kinds = {type(m).__name__ for m in q.modules()}
    assert kinds & {"Linear8bitLt", "Linear4bit"}, kinds  # the layers really are quantized
    samples = random_samples(16, 5, vocab=4096, max_len=64)
    from distill.teacher.batching import pad_batch

    ids, attn = pad_batch([s.input_ids for s in samples], pad_id=0)
    rows = torch.zeros_like(attn, dtype=torch.bool)
    for b, s in enumerate(samples):
        rows[b, : len(s.input_ids) - 1] = torch.from_numpy(s.loss_mask[1:].astype(bool))
    with torch.no_grad():
        lp = ref(ids.cuda(), attention_mask=attn.cuda()).logits.float().log_softmax(-1)[rows.cuda()]
        lq = q(ids.cuda(), attention_mask=attn.cuda()).logits.float().log_softmax(-1)[rows.cuda()]
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    spec = TargetSpec("topk", 16)
    got = compute_targets(q, samples, spec, 1024, 64)  # the product path on quantized weights
    want = compute_targets(ref, samples, spec, 1024, 64)
    top1 = np.mean(
        [
            a.target_ids[r, 0] == b.target_ids[r, 0]
            for a, b in zip(got, want, strict=True)
            for r in range(len(a.target_ids))
        ]
    )
    assert all(np.isfinite(t.target_logprobs).all() for t in got)
    record(
        f"{quantize} teacher vs bf16", mean_kl_nats=kl, top1_agreement=float(top1), max_kl=max_kl
    )
    assert 0 <= kl <= max_kl


# --- a short training run ---------------------------------------------------------------------


def test_short_bf16_training_with_gradient_checkpointing(tmp_path, monkeypatch):
    from distill.config import load_job
    from distill.student import train as train_mod
    from distill.teacher.run import run_teacher

    tok = synth.synthetic_tokenizer(tmp_path / "tokenizer")
    teacher = tmp_path / "teacher"
    model = llama(512, 64, 4)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.save_pretrained(teacher)
    synth.copy_tokenizer(tok, teacher)
    data = {}
    for split, n in (("train", 48), ("eval", 16)):
        lines = (REPO / "data" / "demo" / f"{split}.jsonl").read_text().splitlines()[:n]
        data[split] = tmp_path / f"{split}.jsonl"
        data[split].write_text("\n".join(lines) + "\n")
    job_path = tmp_path / "job.toml"
    job_path.write_text(
        f'[job]\noutput = "{tmp_path / "targets"}"\nseed = 1\n\n'
        f'[teacher]\nmodel = "{teacher}"\ndtype = "bfloat16"\ndevice = "cuda"\n'
        "batch_tokens = 2048\nhead_chunk = 128\nsamples_per_shard = 16\n\n"
        f'[data]\ntrain = "{data["train"]}"\neval = "{data["eval"]}"\nmax_length = 256\n'
        'truncation = "right"\non_invalid = "skip"\n\n'
        '[targets]\nkind = "topk"\nk = 8\n\n'
        '[student]\ninit = "teacher-layers"\nlayers = 2\n\n'
        f'[train]\nrun_dir = "{tmp_path / "run"}"\ncache_dir = "{tmp_path / "cache"}"\n'
        "batch_size = 8\nlr = 1e-3\nwarmup_steps = 2\nmax_steps = 6\ncheckpoint_every = 3\n"
        'eval_every = 3\nloss_chunk = 256\ndevice = "cuda"\ndtype = "bfloat16"\n'
        "gradient_checkpointing = true\n"
    )
    job = load_job(job_path)
    run_teacher(job)
    seen: dict[str, object] = {}
    real_loss, real_load = train_mod.chunked_distill_loss, train_mod._load_student

    def spy_loss(hidden, weight, *args, **kwargs):
        seen["hidden"] = (hidden.dtype, hidden.device.type)
        seen["weight"] = weight.dtype
        return real_loss(hidden, weight, *args, **kwargs)

    def spy_load(*args, **kwargs):
        tokenizer, student, own_tokens = real_load(*args, **kwargs)
        seen["checkpointed"] = sum(
            bool(getattr(m, "gradient_checkpointing", False)) for m in student.modules()
        )
        # the decoder's matmuls run in bf16 under autocast (the residual stream, and so the
        # hidden states the loss gets, stay fp32: the embedding and the norms are fp32); the
        # held-out evaluation runs without autocast
        mlp = student.model.layers[0].mlp.down_proj
        matmuls = seen.setdefault("matmul", set())
        mlp.register_forward_hook(lambda _m, _i, o: matmuls.add(o.dtype))
        return tokenizer, student, own_tokens

    monkeypatch.setattr(train_mod, "chunked_distill_loss", spy_loss)
    monkeypatch.setattr(train_mod, "_load_student", spy_load)
    if importlib.util.find_spec("matplotlib") is None:  # the loss-curve PNG needs it
        monkeypatch.setattr(train_mod, "plot_losses", lambda *a, **k: None)
    summary = train_mod.train(job)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split", "train") == "train"]
    record(
        "train bf16 + gradient checkpointing",
        steps=summary["steps"],
        first_loss=losses[0],
        last_loss=losses[-1],
        tokens_per_s=summary["tokens_per_s"],
        peak_memory_mib=summary["peak_memory_bytes"] / 2**20,
    )
    assert summary["steps"] == 6 and len(losses) == 6
    assert all(math.isfinite(x) for x in losses)
    assert torch.bfloat16 in seen["matmul"] and seen["weight"] == torch.float32
    assert seen["hidden"][1] == "cuda"
    assert seen["checkpointed"] >= 2  # the student's decoder layers
    assert summary["peak_memory_bytes"] > 0
    assert (tmp_path / "run" / "student" / "config.json").is_file()
    assert any(r.get("split") == "eval" for r in rows)
