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
REPO = Path(__file__).resolve().parents[1]


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
    else:  # tied embeddings, another rope theta
        # a stray sliding_window, which LlamaModel ignores (so must the layered pass)
        cfg = LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0, sliding_window=8)
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


class Boom(KeyboardInterrupt):
    """A kill (simulated) in the middle of a chunk."""


def layered_job(tmp_path: Path, model: Path, out: Path, mode: str, n: int = 40):
    from distill.config import load_job

    lines = (REPO / "data" / "demo" / "train.jsonl").read_text().splitlines()[:n]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / f"job-{out.name}.toml"
    path.write_text(
        f'[job]\noutput = "{out}"\nseed = 5\n'
        f'[teacher]\nmodel = "{model}"\ndtype = "float32"\nbatch_tokens = 256\n'
        f'head_chunk = 32\nsamples_per_shard = 5\nmode = "{mode}"\nchunk_tokens = 600\n'
        f'[data]\ntrain = "{tmp_path / "train.jsonl"}"\nmax_length = 128\n'
        'truncation = "right"\n[targets]\nkind = "sample"\ndraws = 20\n'
    )
    return load_job(path)


def shard_targets(url: Path) -> list:
    from distill.format.shards import read_shard

    return [t for f in sorted(url.glob("shard-*.tar")) for t in read_shard(f)]


def test_layered_run_resumes_exactly_after_a_kill_mid_chunk(
    tiny_teacher_dir, tmp_path, monkeypatch
):
    from distill.teacher.run import run_teacher

    clean = run_teacher(layered_job(tmp_path, tiny_teacher_dir, tmp_path / "a", "layered"))
    resident = run_teacher(layered_job(tmp_path, tiny_teacher_dir, tmp_path / "r", "resident"))
    # a layered run killed in the second chunk, in its second layer
    real = LayeredTeacher._layer_forward
    seen = {"chunk2": 0}

    def killed(self, i, *args):
        if self.stats.chunks == 1:
            seen["chunk2"] += 1
            if i == 1:
                raise Boom()
        return real(self, i, *args)

    job = layered_job(tmp_path, tiny_teacher_dir, tmp_path / "b", "layered")
    with monkeypatch.context() as m:
        m.setattr(LayeredTeacher, "_layer_forward", killed)
        with pytest.raises(Boom):
            run_teacher(job)
    assert seen["chunk2"] > 1  # killed mid-chunk, after its first layer
    done = sorted(p.name for p in (tmp_path / "b" / "train").glob("shard-*.tar"))
    n_shards = len(clean["train"].shards)
    assert 1 < len(done) < n_shards - 1  # the first chunk's shards only (chunks span shards)
    assert not (tmp_path / "b" / "train" / "manifest.json").exists()
    resumed = run_teacher(job)["train"]
    # the resumed set is byte for byte the uninterrupted one
    assert [(s.name, s.sha256) for s in resumed.shards] == [
        (s.name, s.sha256) for s in clean["train"].shards
    ]
    assert resumed.job_fingerprint == resident["train"].job_fingerprint  # mode is not a key
    # and its targets are the resident pass's (same sampled ids, log-probs of counts)
    a, b = shard_targets(tmp_path / "b" / "train"), shard_targets(tmp_path / "r" / "train")
    assert_same_targets(a, b)


def test_layered_fanout_tasks_equal_a_resident_single_run(tiny_teacher_dir, tmp_path):
    """A layered teacher run as 3 fan-out tasks (each its own shards s % 3 == i, in its own
    chunks), then finish_split: the same shard bytes as one resident run."""
    from distill.shardset import Part, finish_split
    from distill.store.storage import open_store
    from distill.teacher.run import run_teacher

    resident = run_teacher(layered_job(tmp_path, tiny_teacher_dir, tmp_path / "r", "resident"))
    job = layered_job(tmp_path, tiny_teacher_dir, tmp_path / "f", "layered")
    store = open_store(str(tmp_path / "f" / "train"))
    fp = resident["train"].job_fingerprint  # the mode is not part of it
    for i in range(3):
        assert finish_split(store, fp) is None  # shards missing: no manifest yet
        assert run_teacher(job, Part(i, 3)) == {"train": None}
    mine = sorted(p.name for p in (tmp_path / "f" / "train").glob("shard-*.tar"))
    want = resident["train"].shards
    assert len(want) == 8 and len(mine) == 8  # 40 samples, 5 per shard, chunks of 600 tokens
    fanout = finish_split(store, fp)
    assert fanout is not None and fanout.teacher_seconds > 0  # the tasks' compute time
    assert [(s.name, s.sha256) for s in fanout.shards] == [(s.name, s.sha256) for s in want]
    assert fanout.job_fingerprint == resident["train"].job_fingerprint


def test_mode_and_quantize_fields_are_checked():
    from distill.config import job_from_dict

    def job(**teacher):
        return job_from_dict({"teacher": teacher})

    assert job().teacher.mode == "auto" and job().teacher.quantize == "none"
    assert job().teacher.chunk_tokens == 2**20
    for bad, needle in (
        ({"mode": "streamed"}, "teacher.mode"),
        ({"quantize": "int4"}, "teacher.quantize"),
        ({"chunk_tokens": 0}, "teacher.chunk_tokens"),
        ({"quantize": "nf4", "device": "cpu"}, "needs a CUDA device"),
        ({"quantize": "int8", "mode": "layered", "device": "cuda"}, "resident pass"),
        ({"quantize": "int8", "dtype": "float32", "device": "cuda"}, 'teacher.dtype = "bfloat16"'),
    ):
        with pytest.raises(DistillError, match=needle):
            job(**bad)


def test_quantize_is_refused_without_cuda(tmp_path):
    path = save_random("llama", tmp_path / "m")
    with pytest.raises(DistillError, match="needs a CUDA device"):
        models.load_model(path, "bfloat16", "cpu", "int8")


def mode(job, m: str):
    return job.model_copy(update={"teacher": job.teacher.model_copy(update={"mode": m})})


def test_auto_mode_picks_layered_only_when_resident_does_not_fit(tmp_path):
    from transformers import AutoConfig

    from distill.config import job_from_dict
    from distill.teacher.fit import choose, teacher_profile

    path = save_random("qwen2", tmp_path / "m")
    p = teacher_profile(AutoConfig.from_pretrained(path))
    t = {"dtype": "float32", "chunk_tokens": 256, "batch_tokens": 64, "head_chunk": 8}
    job = job_from_dict({"teacher": t})
    roomy = choose(job, p, 2**30, None, cuda=False)
    assert roomy.mode == "resident" and roomy.fits
    assert roomy.device["weights"] == 4 * p.params  # fp32, tied or not: each tensor once
    resident_peak = roomy.peak
    # a budget between the layered and the resident peaks
    layered = choose(mode(job, "layered"), p, 2**30, None, cuda=False)
    assert layered.peak < resident_peak
    budget = int((layered.peak + resident_peak) / 2 / 0.95)
    tight = choose(job, p, budget, None, cuda=False)
    assert tight.mode == "layered" and tight.fits
    with pytest.raises(DistillError, match="does not fit the device in resident mode"):
        choose(mode(job, "resident"), p, budget, None, cuda=False)


@pytest.mark.slow
def test_layered_equals_resident_on_smollm2(smol_dir, smol_tokenizer):
    from distill.data.dataset import tokenize_file

    samples = tokenize_file(REPO / "data" / "demo" / "eval.jsonl", smol_tokenizer, 256, "right")
    groups = [samples[:10], samples[10:16]]
    resident = models.load_model(smol_dir, "float32")
    layered = LayeredTeacher(smol_dir, "float32")
    for kind in ("topk", "sample"):
        spec = TargetSpec(kind=kind, k=16, draws=50, sampling="systematic")
        want = [compute_targets(resident, g, spec, 1024, 100, seed=7) for g in groups]
        got = layered.compute_groups(groups, spec, 1024, 100, seed=7)
        for w, g in zip(want, got, strict=True):
            assert_same_targets(w, g, atol=1e-5)


def child_peak(mode: str, path: Path) -> dict:
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "peak_memory_child.py"), mode, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def _available_memory() -> float:
    """MemAvailable from /proc/meminfo (Linux), in bytes; infinite where there is none."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return float("inf")
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return float("inf")


def test_layered_peak_memory_is_about_a_layer_not_the_model(tmp_path):
    """A ~1B-parameter random Llama (2 GB of bf16 on disk, 4 GB as float32): the layered pass
    grows the process by the layer computing, the one prefetched and the file being read;
    the resident pass by the whole model."""
    from random_checkpoint import write_random_llama
    from transformers import AutoConfig

    from distill.teacher.fit import teacher_profile

    free = _available_memory()
    if free < 8 * 2**30:  # the resident side alone needs ~6 GB; less would measure swapping
        pytest.skip(f"needs 8 GiB of available memory for the resident side, {free / 2**30:.1f}")
    path = write_random_llama(tmp_path / "big")
    p = teacher_profile(AutoConfig.from_pretrained(path))
    assert 0.95e9 < p.params < 1.1e9
    layer_fp32 = 4 * p.layer_params()  # ~245 MB
    layered = child_peak("layered", path)
    resident = child_peak("resident", path)
    grew_layered = layered["peak"] - layered["base"]
    grew_resident = resident["peak"] - resident["base"]
    assert layered["weight_bytes_read"] >= 2 * p.params  # every bf16 weight was read
    assert grew_resident > 4 * p.params  # the whole float32 model
    # two float32 layers (computing + prefetched), one bf16 layer file mapped while it is
    # copied, and this pass's activations (256 tokens: a few MB)
    assert grew_layered < 2 * layer_fp32 + layer_fp32 / 2 + 200e6, (grew_layered, layer_fp32)
    assert grew_layered < grew_resident / 5


def test_quantised_resident_ways_are_sized_by_their_weight_bytes(tmp_path):
    """A 13B-class shape (meta tensors only): bf16 does not fit a 24 GiB card, int8 and nf4 do."""
    from transformers import LlamaConfig

    from distill.config import job_from_dict
    from distill.teacher.fit import QUANT_BYTES, choose, teacher_profile, ways

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
    )
    p = teacher_profile(cfg)
    assert 12.5e9 < p.params < 13.5e9
    t = {"device": "cuda", "batch_tokens": 2048}
    by = {(w.mode, w.quantize): w for w in ways(job_from_dict({"teacher": t}), p, 24 * 2**30, None)}
    embed_bytes = 2 * (p.params - p.non_embedding_params)
    for q in ("int8", "nf4"):
        body = by[("resident", q)].device["weights"] - embed_bytes
        assert body == int(p.non_embedding_params * QUANT_BYTES[q])
    assert not by[("resident", "none")].fits and by[("resident", "int8")].fits
    assert by[("resident", "nf4")].fits and by[("layered", "none")].fits
    nf4 = choose(job_from_dict({"teacher": {**t, "quantize": "nf4"}}), p, 24 * 2**30, None)
    assert (nf4.mode, nf4.quantize) == ("resident", "nf4")
    auto = choose(job_from_dict({"teacher": t}), p, 24 * 2**30, None)  # never quantises unasked
    assert (auto.mode, auto.quantize) == ("layered", "none")
