"""distill-ctl cost-estimate: the arithmetic on a tiny job, overrides, calibration, refusal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distill.cloud import cost
from distill.cloud.cost import CostOptions, estimate_cost, render_table
from distill.cloud.counting import BOUNDED, DataCounts, count_data, count_split
from distill.cloud.pricing import DATA_READ_RECORDS_PER_S, DEFAULT_PREP_TOKENS_PER_S
from distill.cloud.probe import probe_sample_bytes
from distill.cloud.sampling import estimate_data
from distill.config import load_job
from distill.errors import DistillError

REPO = Path(__file__).resolve().parents[1]

# The tiny teacher of conftest.py: vocab 49152, hidden 32, MLP 64, 4 layers, 4 heads, 2 KV heads.
TINY_EMBED = 49152 * 32
TINY_LAYER = (32 * 32 + 2 * 32 * 16 + 32 * 32) + 3 * 32 * 64 + 2 * 32  # attn + MLP + 2 norms
TINY_NON_EMBED = 4 * TINY_LAYER + 32  # + final norm


def make_job(tmp_path: Path, model: Path, n_train: int = 40, n_eval: int = 10, **teacher) -> Path:
    for name, n in (("train", n_train), ("eval", n_eval)):
        lines = (REPO / "data" / "demo" / f"{name}.jsonl").read_text().splitlines()[:n]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    t = {"batch_tokens": 512, "head_chunk": 64, "samples_per_shard": 16, **teacher}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in t.items())
    path = tmp_path / "job.toml"
    path.write_text(
        f'[job]\nname = "tiny"\noutput = "{tmp_path / "out"}"\n\n'
        f'[teacher]\nmodel = "{model}"\n{body}\n\n'
        f'[data]\ntrain = "train.jsonl"\neval = "eval.jsonl"\nmax_length = 128\n'
        'truncation = "right"\n\n[targets]\nkind = "topk"\nk = 8\nvalues = "f16"\nzstd = false\n'
    )
    return path


def expected_counts(job, tokenizer) -> dict[str, int]:
    """Tokens, targets and the teacher's padded batches, counted independently."""
    from distill.data.dataset import tokenize_file
    from distill.teacher.batching import token_budget_batches

    c = dict(samples=0, shards=0, tokens=0, targets=0, padded=0, ctx=0)
    for split in ("train", "eval"):
        samples = tokenize_file(job.resolve(getattr(job.data, split)), tokenizer, 128, "right")
        c["samples"] += len(samples)
        c["tokens"] += sum(len(s.input_ids) for s in samples)
        c["targets"] += sum(int(s.loss_mask[1:].sum()) for s in samples)
        for lo in range(0, len(samples), 16):
            c["shards"] += 1
            lens = [len(s.input_ids) for s in samples[lo : lo + 16]]
            for b in token_budget_batches(lens, 512):
                c["padded"] += len(b) * max(lens[i] for i in b)
                c["ctx"] += len(b) * max(lens[i] for i in b) ** 2
    return c


def test_arithmetic_on_a_tiny_job(tiny_teacher_dir, smol_tokenizer, tmp_path):
    job = load_job(make_job(tmp_path, tiny_teacher_dir))
    e = estimate_cost(job)
    c = expected_counts(job, smol_tokenizer)

    assert e.profile.params == TINY_EMBED + TINY_NON_EMBED  # tied head counted once
    assert e.profile.non_embedding_params == TINY_NON_EMBED
    d = e.data
    assert (d.samples, d.tokens, d.target_tokens) == (50, c["tokens"], c["targets"])
    assert (d.padded_tokens, d.shards) == (c["padded"], c["shards"]) and d.padded_tokens > d.tokens
    flops = 2 * TINY_NON_EMBED * c["padded"] + 2 * 4 * 32 * c["ctx"] + 2 * 32 * 49152 * c["targets"]
    assert e.flops == pytest.approx(flops, rel=1e-12)

    # bfloat16 teacher: 121 TFLOP/s dense peak x the assumed MFU 0.35
    compute_h = flops / (121e12 * 0.35) / 3600
    # 10 min + the checkpoint at 200 MB/s + the data preparation: every record read, every
    # token tokenised (one VM), at the L4 VM's assumed rates
    prep_h = (50 / DATA_READ_RECORDS_PER_S + c["tokens"] / DEFAULT_PREP_TOKENS_PER_S) / 3600
    setup_h = 10 / 60 + (TINY_EMBED + TINY_NON_EMBED) * 2 / 200e6 / 3600 + prep_h
    assert (
        e.prep_hours == pytest.approx(prep_h) and e.to_dict()["hours"]["data_prep"] == e.prep_hours
    )
    assert e.compute_hours == pytest.approx(compute_h)
    assert e.on_demand_hours == pytest.approx(compute_h + setup_h)
    assert e.spot_hours == pytest.approx((compute_h + setup_h) * 1.15)
    assert e.usd["vm_spot"] == pytest.approx(e.spot_hours * 0.34)
    assert e.usd["vm_on_demand"] == pytest.approx(e.on_demand_hours * 0.85)
    assert e.usd["disk_spot"] == pytest.approx(e.spot_hours * 100 * 0.10 / 730)

    # packed v2: 50 probe samples of the average shape through the real writer + the tar ends
    per_sample = probe_sample_bytes(
        job.targets.spec(),
        job.targets.codec_spec(),
        49152,
        round(c["tokens"] / 50),
        round(c["targets"] / 50),
        16,
    )
    shard_bytes = int(50 * per_sample + c["shards"] * 1024)
    assert e.shard_bytes == shard_bytes
    assert f"samples x {per_sample:,.0f}" in e.bytes_basis
    gb = shard_bytes / 2**30
    assert e.usd["storage"] == pytest.approx(gb * 1.0 * 0.020)
    assert e.usd["egress"] == pytest.approx(gb * 0.12)
    assert e.usd["nat_spot"] == pytest.approx(e.spot_hours * 0.0014)  # the NAT gateway's hours
    total = e.usd["vm_spot"] + e.usd["disk_spot"] + e.usd["storage"] + e.usd["egress"]
    # the local teacher directory, kept in the run's bucket beside the shards
    tiny = sum(p.stat().st_size for p in tiny_teacher_dir.iterdir() if p.is_file())
    assert e.weights.kind == "local" and e.weights.bytes == tiny
    assert e.usd["weights"] == pytest.approx(tiny / 2**30 * 0.020)
    assert e.usd["total_spot"] == pytest.approx(total + e.usd["nat_spot"] + e.usd["weights"])

    rows = dict(e.assumptions())
    assert "uncalibrated" in rows["MFU (model FLOPs utilisation)"]
    assert "as of 2026-11" in rows["prices"] and "verify before relying" in rows["prices"]
    assert "LM head only at target positions" in rows["FLOPs formula"]
    assert "the data preparation" in rows["setup"] and "scaled to 8 vCPUs" in rows["setup"]
    table = {
        r[0]: r[2] for r in zip(*(c._cells for c in cost.render_table(e).columns), strict=True)
    }
    assert "spot prices change" in table["$ VM spot"] and "--prices FILE" in table["$ VM spot"]
    out = json.loads(json.dumps(e.to_dict()))  # JSON-serialisable
    assert out["hours"]["spot"] == pytest.approx(e.spot_hours) and out["calibrated"] is False

    # Overrides of the stated assumptions move the numbers as stated.
    e2 = estimate_cost(
        job, CostOptions(mfu=0.7, preemption_overhead=0.5, setup_minutes=0, downloads=3)
    )
    assert e2.compute_hours == pytest.approx(compute_h / 2)
    assert e2.spot_hours == pytest.approx(e2.on_demand_hours * 1.5)
    assert e2.usd["egress"] == pytest.approx(3 * e.usd["egress"])


def test_shard_bytes_estimate_matches_a_real_teacher_run(tiny_teacher_dir, tmp_path):
    from distill.teacher.run import run_teacher

    path = make_job(tmp_path, tiny_teacher_dir, dtype="float32")
    job = load_job(path)
    estimated = estimate_cost(job)
    manifests = run_teacher(job)
    actual = sum(m.nbytes for m in manifests.values())
    assert abs(estimated.shard_bytes - actual) / actual < 0.10
    assert estimated.bytes_basis.startswith("estimated")

    # Now a run exists at job.output: its manifests' bytes per target token are used.
    measured = estimate_cost(job)
    assert measured.bytes_basis.startswith(f"{actual / measured.data.target_tokens:,.1f} bytes")
    assert "measured" in measured.bytes_basis and "(eval, train)" in measured.bytes_basis
    assert measured.shard_bytes == pytest.approx(actual, abs=1)
    one = estimate_cost(job, CostOptions(reference_run=str(tmp_path / "out" / "train")))
    assert "(train)" in one.bytes_basis  # one shard set: tiny sets are mostly tar padding
    assert abs(one.shard_bytes - actual) / actual < 0.10
    with pytest.raises(DistillError, match="no manifest"):
        estimate_cost(load_job(path, ["targets.k=4"]), CostOptions(reference_run=str(tmp_path)))


def test_price_override_file(tiny_teacher_dir, tmp_path):
    job = load_job(make_job(tmp_path, tiny_teacher_dir))
    base = estimate_cost(job)
    toml = tmp_path / "prices.toml"
    toml.write_text('as_of = "2027-01"\nvm_spot_per_hour = 1.0\negress_per_gb = 0\n')
    e = estimate_cost(job, CostOptions(prices=toml))
    assert e.prices.vm_spot_per_hour == 1.0 and e.prices.vm_on_demand_per_hour == 0.85
    assert e.usd["vm_spot"] == pytest.approx(base.spot_hours * 1.0)
    assert e.usd["egress"] == 0 and e.usd["storage"] == pytest.approx(base.usd["storage"])
    rows = dict(e.assumptions())
    assert "as of 2027-01" in rows["prices"] and str(toml) in rows["prices"]

    js = tmp_path / "prices.json"
    js.write_text(json.dumps({"prices": {"vm_on_demand_per_hour": 2}}))
    assert cost.load_prices(js).vm_on_demand_per_hour == 2.0
    js.write_text(json.dumps({"vm_spot_per_hour": 0.3, "gpu_per_hour": 1}))
    with pytest.raises(DistillError, match="unknown price 'gpu_per_hour'"):
        cost.load_prices(js)
    js.write_text(json.dumps({"vm_spot_per_hour": -1}))
    with pytest.raises(DistillError, match="vm_spot_per_hour must be a number >= 0"):
        cost.load_prices(js)
    js.write_text("{not json")
    with pytest.raises(DistillError, match="not valid JSON"):
        cost.load_prices(js)


def test_calibration_file(tiny_teacher_dir, tmp_path):
    job = load_job(make_job(tmp_path, tiny_teacher_dir))
    base = estimate_cost(job)
    # The same teacher measured at the throughput that means 20% MFU on an L4.
    tps = 0.2 * 121e12 / base.flops_per_token
    cal = tmp_path / "l4.json"
    cal.write_text(
        json.dumps({"tokens_per_s": tps, "model": str(tiny_teacher_dir), "gpu": "NVIDIA L4"})
    )
    e = estimate_cost(job, CostOptions(calibration=cal))
    assert e.mfu == pytest.approx(0.2)
    assert e.tokens_per_s == pytest.approx(tps)
    assert e.compute_hours == pytest.approx(base.compute_hours * 0.35 / 0.2)
    row = dict(e.assumptions())["MFU (model FLOPs utilisation)"]
    assert "calibrated" in row and "uncalibrated" not in row and str(cal) in row

    # bench/teacher_pass.py's summary is accepted as it is; explicit FLOPs per token win.
    bench = {
        "ours_tokens_per_s": 1000.0,
        "model": "some-other-teacher",
        "flops_per_token": 2.42e10,
        "machine": {"cuda_device": "NVIDIA L4"},
    }
    cal.write_text(json.dumps(bench))
    assert estimate_cost(job, CostOptions(calibration=cal)).mfu == pytest.approx(0.2)

    for bad, match in (
        ({**bench, "machine": {"cuda_device": "NVIDIA H100 80GB HBM3"}}, "not an NVIDIA L4"),
        ({k: v for k, v in bench.items() if k != "machine"}, "unnamed device"),
        ({**bench, "ours_tokens_per_s": 1e9}, "impossible"),
        ({"gpu": "NVIDIA L4", "model": "x"}, "tokens_per_s"),
    ):
        cal.write_text(json.dumps(bad))
        with pytest.raises(DistillError, match=match):
            estimate_cost(job, CostOptions(calibration=cal))
    with pytest.raises(DistillError, match="not both"):
        estimate_cost(job, CostOptions(calibration=cal, mfu=0.3))


def test_calibration_measured_on_another_gpu_is_scaled_by_the_flop_ratio(
    tiny_teacher_dir, tmp_path
):
    """bench/gpu/check.py's file: measured on an H100, with that GPU's dense peak. Its MFU is
    measured against the H100's peak and assumed on the L4 (throughput x 121 / 989.4)."""
    job = load_job(make_job(tmp_path, tiny_teacher_dir))
    base = estimate_cost(job)
    h100 = 989.4e12
    tps = 0.2 * h100 / base.flops_per_token  # 20% MFU on the H100
    raw = {
        "tokens_per_s": tps,
        "model": "SmolLM2-135M shape, random weights",
        "gpu": "NVIDIA H100 80GB HBM3",
        "gpu_peak_flops": h100,
        "dtype": "bfloat16",
        "flops_per_token": base.flops_per_token,
    }
    cal = tmp_path / "h100.json"
    cal.write_text(json.dumps(raw))
    e = estimate_cost(job, CostOptions(calibration=cal))
    assert e.mfu == pytest.approx(0.2)
    assert e.tokens_per_s == pytest.approx(tps * 121e12 / h100)
    assert e.compute_hours == pytest.approx(base.compute_hours * 0.35 / 0.2)
    assert e.calibration is not None and not e.calibration.on_l4
    row = dict(e.assumptions())["MFU (model FLOPs utilisation)"]
    assert "measured on NVIDIA H100 80GB HBM3, not an L4" in row
    assert "scaled to the L4 by the FLOP ratio (121.0 / 989.4 TFLOP/s" in row
    out = e.to_dict()
    assert out["calibration_scaled"] is True and out["calibration_gpu"] == raw["gpu"]
    table = {
        r[0]: r[2] for r in zip(*(c._cells for c in cost.render_table(e).columns), strict=True)
    }
    assert "scaled by the FLOP ratio" in table["throughput"]

    # an L4 file ignores gpu_peak_flops (the datasheet's L4 peak is the one)
    cal.write_text(json.dumps({**raw, "gpu": "NVIDIA L4", "tokens_per_s": tps * 121e12 / h100}))
    e = estimate_cost(job, CostOptions(calibration=cal))
    assert e.mfu == pytest.approx(0.2) and e.calibration.on_l4
    assert "not an L4" not in dict(e.assumptions())["MFU (model FLOPs utilisation)"]
    for bad, match in (
        ({**raw, "gpu_peak_flops": 0}, "gpu_peak_flops must be > 0"),
        ({**raw, "gpu_peak_flops": "989e12"}, "gpu_peak_flops must be > 0"),
        ({**raw, "gpu_peak_flops": 1e12}, "impossible.*gpu_peak_flops"),
        ({k: v for k, v in raw.items() if k != "gpu_peak_flops"}, "needs 'gpu_peak_flops'"),
    ):
        cal.write_text(json.dumps(bad))
        with pytest.raises(DistillError, match=match):
            estimate_cost(job, CostOptions(calibration=cal))


def seventy_b(smol_tokenizer, dest: Path, safetensors: bool = True) -> Path:
    """A 70B-class config (140 GB of bf16 weights); only meta tensors are ever built. A
    stand-in model.safetensors: the layered way needs the checkpoint to be safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=49152,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ).save_pretrained(dest)
    smol_tokenizer.save_pretrained(dest)
    if safetensors:
        save_file({"stand_in": torch.zeros(1)}, dest / "model.safetensors")
    return dest


def test_teacher_too_big_for_an_l4_is_refused_in_resident_mode(smol_tokenizer, tmp_path):
    big = seventy_b(smol_tokenizer, tmp_path / "big-teacher")
    job = load_job(make_job(tmp_path, big, mode="resident"))
    (tmp_path / "train.jsonl").unlink()  # refused before any tokenisation
    with pytest.raises(DistillError) as info:
        estimate_cost(job)
    msg = str(info.value)
    assert "does not fit one L4 in resident mode" in msg and "weights 1" in msg  # ~128 GiB
    assert "ways that fit: layered" in msg  # the fix is named (nf4: ~37 GiB does not fit)
    assert "\n" not in msg


def test_teacher_too_big_for_an_l4_runs_layered(smol_tokenizer, tmp_path):
    from distill.cloud.cost import l4_usable_bytes
    from distill.teacher.fit import flops_per_token, teacher_profile, throughput

    big = seventy_b(smol_tokenizer, tmp_path / "big-teacher")
    e = estimate_cost(load_job(make_job(tmp_path, big, batch_tokens=2048)))  # mode auto
    assert e.way.mode == "layered" and e.way.quantize == "none"
    assert sum(e.memory.values()) <= l4_usable_bytes()
    layer = e.memory["layer_weights"] / 2
    assert 1.5e9 < layer < 2e9  # one 70B layer in bf16: ~1.7 GB
    assert e.to_dict()["mode"] == "layered" and e.layered is not None
    # this tiny dataset is one small chunk: weight streaming dominates, and the estimate says so
    # (each split runs its own chunks: the largest is the train split's, whole)
    train = sum(e.data.shard_tokens["train"])
    assert e.layered.chunk_tokens == train < e.data.tokens and e.layered.stream_share > 0.5
    assert e.layered_overhead_hours > 0
    # at the default chunk (2^20 tokens) the model puts streaming under 10% of the time
    p = teacher_profile(__import__("transformers").AutoConfig.from_pretrained(big))
    tp = throughput(p, "bfloat16", e.way, 2**20, flops_per_token(p, 128), 121e12 * 0.35)
    assert tp.stream_share <= 0.10 and tp.stream_s > tp.exposed_stream_s
    # refused when the job asks for more host memory than the L4 VM has
    with pytest.raises(DistillError, match="host ~"):
        estimate_cost(load_job(make_job(tmp_path, big, chunk_tokens=2**22)))


def test_cli_table_json_and_one_line_errors(tiny_teacher_dir, tmp_path):
    path = make_job(tmp_path, tiny_teacher_dir)
    cmd = [sys.executable, "-m", "distill.cli", "cost-estimate", "--job", str(path)]
    r = subprocess.run(
        [*cmd, "--json", str(tmp_path / "c.json")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "$ total (spot)" in r.stdout and "assumption: MFU" in r.stdout
    assert json.loads((tmp_path / "c.json").read_text())["usd"]["total_spot"] > 0

    (tmp_path / "p.json").write_text("[1, 2]")
    for extra, needle in (
        (["--mfu", "1.5"], "--mfu must be in (0, 1]"),
        (["--preemption-overhead", "-1"], "--preemption-overhead"),
        (["--prices", "nope.toml"], "price file nope.toml not found"),
        (["--prices", "p.json"], "p.json: expected a table"),
    ):
        r = subprocess.run(
            [*cmd, *extra], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert r.returncode == 2, (extra, r.stderr)
        assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr


def test_cli_prices_the_boot_disk_teacher_cloud_creates(tiny_teacher_dir, tmp_path):
    """cost-estimate prices the disk that each VM needs for the checkpoint it stages (as
    teacher-cloud sizes it), not a fixed 100 GB."""
    import shutil

    from distill.cloud.spec import BOOT_DISK_GB
    from distill.cloud.staging import staged_disk_gb

    big = tmp_path / "big"
    shutil.copytree(tiny_teacher_dir, big)
    with open(big / "model-00002.safetensors", "wb") as f:  # 150 GiB, sparse
        f.truncate(150 * 2**30)
    path = make_job(tmp_path, big)
    want = staged_disk_gb(load_job(path))
    assert want > 150 + 16 > BOOT_DISK_GB
    cmd = [sys.executable, "-m", "distill.cli", "cost-estimate", "--job", str(path)]
    r = subprocess.run(
        [*cmd, "--json", str(tmp_path / "c.json")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert f"{want} GB pd-balanced" in r.stdout.replace("\n", " ")
    small = estimate_cost(load_job(make_job(tmp_path, tiny_teacher_dir)))
    usd = json.loads((tmp_path / "c.json").read_text())["usd"]
    assert usd["total_spot"] > small.usd["total_spot"]  # the bigger disk costs more


def test_other_target_kinds_are_probed_and_sized(tiny_teacher_dir, tmp_path):
    path = make_job(tmp_path, tiny_teacher_dir)
    topk = estimate_cost(load_job(path))
    topp = estimate_cost(load_job(path, ['targets.kind="topp"']))
    assert topp.bytes_basis.startswith("estimated: samples x")  # its own probe samples
    assert topp.memory["head_chunk"] > topk.memory["head_chunk"]  # the chunk is sorted


@pytest.mark.parametrize(
    "targets",
    [
        {"kind": "sample", "sampling": "systematic", "codec": "packed", "zstd": True},
        {"kind": "topk", "k": 8, "codec": "packed", "values": "log8", "zstd": True},
    ],
    ids=["sample-sys-v2-zstd", "topk-v2-log8"],
)
def test_packed_shard_bytes_are_measured_on_probe_samples(tiny_teacher_dir, tmp_path, targets):
    """Packed codecs: probe samples of the job's average shape go through the real writer.
    The tiny random teacher is far peakier than a real LM (fewer distinct ids per row) and its
    shards share a chat template under zstd, so the estimate is high here (2.5x for sampled
    targets); the probe's rows are calibrated on real SmolLM2 targets (next test)."""
    from distill.teacher.run import run_teacher

    path = make_job(tmp_path, tiny_teacher_dir, dtype="float32")
    sets = [f"targets.{k}={json.dumps(v)}" for k, v in targets.items()]
    job = load_job(path, sets)
    estimated = estimate_cost(job)
    assert estimated.bytes_basis.startswith("estimated: samples x")
    assert f"packed v{job.targets.codec_spec().version}" in estimated.bytes_basis
    actual = sum(m.nbytes for m in run_teacher(job).values())
    assert 0.9 < estimated.shard_bytes / actual < 3.0


def test_probe_rows_hit_as_many_distinct_ids_as_real_smollm2_targets():
    """The probe's Zipf-like rows against real SmolLM2-135M targets (tests/data/old_shards):
    distinct ids per row under the same draws, within 35%."""
    import numpy as np

    from distill.cloud.probe import probe_samples
    from distill.format.shards import read_shard
    from distill.format.spec import TargetSpec

    old = REPO / "tests" / "data" / "old_shards"
    for name, spec in (
        ("packed-v1-sample20-log8-zstd", TargetSpec("sample", draws=20)),
        ("packed-v1-topk4+sample16-f16", TargetSpec("topk+sample", 4, draws=16)),
    ):
        real = list(read_shard(old / name / "shard-000000.tar"))
        per_row = np.concatenate([np.isfinite(s.target_logprobs).sum(1) for s in real]).mean()
        probe = probe_samples(spec, 49152, 40, 20, 8)
        got = np.concatenate([np.isfinite(s.target_logprobs).sum(1) for s in probe]).mean()
        assert 0.65 < got / per_row < 1.35, (name, got, per_row)


def test_plan_teacher_says_which_way_fits(smol_tokenizer, tmp_path):
    big = seventy_b(smol_tokenizer, tmp_path / "big-teacher")
    path = make_job(tmp_path, big)
    cmd = [sys.executable, "-m", "distill.cli", "plan", "--teacher", "--job", str(path)]
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run(
        [*cmd, "--gpu-mem", "24GiB"], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if "│" in line}
    assert "│   no │" in rows["resident"] and "│   no │" in rows["resident + nf4"]
    assert "│  yes │" in rows["layered"]
    assert "--set teacher.mode=layered" in r.stdout
    # a budget too small for even one layer: the refusal, naming the numbers
    r = subprocess.run(
        [*cmd, "--gpu-mem", "2GiB"], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 2, r.stderr  # like the student plan: the table, then the error
    assert "│  yes │" not in r.stdout and "│   no │" in r.stdout
    assert "does not fit 2.0 GiB in layered mode" in r.stderr and "nothing fits" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_vms_split_the_wall_time_not_the_work(tiny_teacher_dir, tmp_path):
    """--vms N: VM i takes the shards s % N == i of each split; every VM pays its setup (its
    data preparation: the busiest VM's share of the tokens), the wall time is the busiest VM's,
    and a VM without a shard is not counted."""
    job = load_job(make_job(tmp_path, tiny_teacher_dir))  # train: 3 shards, eval: 1 (16 each)
    one, two, many = (estimate_cost(job, CostOptions(vms=n)) for n in (1, 2, 100))
    compute = one.compute_hours
    assert (one.tasks, two.tasks, many.tasks) == (1, 2, 3)
    assert one.wall_hours == pytest.approx(one.spot_hours)  # one VM: as before
    p = {s: c["padded_tokens"] for s, c in one.data.per_split.items()}
    total = p["train"] + p["eval"]
    # VM 0 of 2: train shards 0 and 2, eval shard 0; of 3: train shard 0, eval shard 0
    share = [
        (two, (p["train"] * 2 / 3 + p["eval"]) / total),
        (many, (p["train"] / 3 + p["eval"]) / total),
    ]
    records = one.data.samples / DATA_READ_RECORDS_PER_S / 3600
    for e, f in share:
        assert e.setup_hours - e.prep_hours == pytest.approx(one.setup_hours - one.prep_hours)
        assert e.prep_hours == pytest.approx(
            records + one.data.tokens * f / DEFAULT_PREP_TOKENS_PER_S / 3600
        )
        assert e.wall_hours == pytest.approx((e.setup_hours + compute * f) * 1.15)
    assert one.prep_hours > two.prep_hours > many.prep_hours
    assert two.on_demand_hours == pytest.approx(compute + 2 * two.setup_hours)
    assert many.spot_hours == pytest.approx((compute + 3 * many.setup_hours) * 1.15)
    assert many.usd["vm_spot"] == pytest.approx(many.spot_hours * 0.34)
    assert many.to_dict()["vms"] == 3 and many.to_dict()["hours"]["wall"] == many.wall_hours
    with pytest.raises(DistillError, match="--vms must be >= 1"):
        estimate_cost(job, CostOptions(vms=0))


def test_cloud_nat_is_priced_for_the_batch_vms_driver(tiny_teacher_dir, tmp_path):
    """The Batch VMs (batch-debian) download the NVIDIA driver through Cloud NAT: each boot
    (preemption relaunches too) ~0.5 GiB at $0.045/GiB, plus the gateway's $0.0014 per
    VM-hour, flat $0.044/h above 32 VMs. The single VM's COS driver comes from Google."""
    from distill.cloud.cost import nat_usd

    job = load_job(make_job(tmp_path, tiny_teacher_dir))  # 3 train shards
    vm = estimate_cost(job, CostOptions())
    fan = estimate_cost(job, CostOptions(vms=3, engine="batch"))
    assert vm.nat_gb == 0 and vm.usd["nat_spot"] == pytest.approx(vm.spot_hours * 0.0014)
    assert fan.nat_gb == pytest.approx(0.5 * 3 * 1.15)
    assert fan.usd["nat_spot"] == pytest.approx(fan.spot_hours * 0.0014 + fan.nat_gb * 0.045)
    assert fan.usd["nat_on_demand"] == pytest.approx(fan.on_demand_hours * 0.0014 + 0.5 * 3 * 0.045)
    for e in (vm, fan):
        u = e.usd
        parts = u["vm_spot"] + u["disk_spot"] + u["nat_spot"] + u["storage"] + u["egress"]
        assert u["total_spot"] == pytest.approx(parts + u["weights"])
    table = {r[0]: r[1:] for r in zip(*(c._cells for c in render_table(fan).columns), strict=True)}
    assert "1.72 GB" in table["$ network (Cloud NAT)"][1]
    assert "downloads the NVIDIA driver" in dict(fan.assumptions())["network"]
    # above 32 VMs the gateway's flat rate, over the wall time
    prices = fan.prices
    assert nat_usd(prices, 100.0, 2.0, 50, 0.0) == pytest.approx(2.0 * 0.044)
    assert nat_usd(prices, 100.0, 2.0, 32, 1.0) == pytest.approx(100 * 0.0014 + 0.045)


def test_layered_is_refused_outside_its_families_and_without_safetensors(smol_tokenizer, tmp_path):
    """A 20B GPT-NeoX (not a layered family) and a 70B Llama without *.safetensors: the
    estimate (and so teacher-cloud) refuses before any VM, naming why, instead of pinning
    teacher.mode = "layered" for tasks that would all fail."""
    from transformers import AutoConfig, GPTNeoXConfig

    from distill.teacher.fit import teacher_profile, ways

    neox = tmp_path / "neox-20b"
    GPTNeoXConfig(
        vocab_size=50432,
        hidden_size=6144,
        intermediate_size=24576,
        num_hidden_layers=44,
        num_attention_heads=64,
    ).save_pretrained(neox)
    smol_tokenizer.save_pretrained(neox)
    (neox / "model.safetensors").write_bytes(b"")
    p = teacher_profile(AutoConfig.from_pretrained(neox), neox)
    assert 19e9 < p.params < 22e9 and p.model_type == "gpt_neox"
    job = load_job(make_job(tmp_path, neox))  # teacher.mode = "auto"
    layered = ways(job, p, cost.L4_MEMORY_BYTES, None)[-1]
    assert layered.mode == "layered" and layered.peak < cost.l4_usable_bytes()  # it would fit
    assert not layered.fits and "not 'gpt_neox'" in layered.unavailable
    with pytest.raises(DistillError, match="cannot run layered on one L4: layered mode supports"):
        cost.plan_l4(job, p)
    with pytest.raises(DistillError, match="not 'gpt_neox'.*resident needs ~"):
        estimate_cost(job)

    bare = seventy_b(smol_tokenizer, tmp_path / "no-safetensors", safetensors=False)
    with pytest.raises(DistillError, match="reads safetensors weights"):
        estimate_cost(load_job(make_job(tmp_path, bare, mode="layered")))


def test_layered_overhead_is_per_task_and_split(smol_tokenizer, tmp_path):
    """Every chunk of every split of every task streams all the layers: with --vms N the
    layered overhead grows with N (VM-hours), the busiest VM's share goes into the wall time,
    and a preemption loses a whole chunk (a longer one costs more)."""
    from distill.teacher.fit import throughput

    big = seventy_b(smol_tokenizer, tmp_path / "big-teacher")
    job = load_job(make_job(tmp_path, big, batch_tokens=2048))  # train: 3 shards, eval: 1
    one, two, three = (estimate_cost(job, CostOptions(vms=n)) for n in (1, 2, 3))
    assert one.way.mode == "layered" and (one.tasks, two.tasks, three.tasks) == (1, 2, 3)
    shards = one.data.shard_tokens
    assert [len(v) for v in shards.values()] == [3, 1]
    assert sum(map(sum, shards.values())) == one.data.tokens
    sustained = 121e12 * 0.35

    def chunk_s(tokens: int) -> float:  # every split of a task is one chunk here (< 2^20)
        tp = throughput(one.profile, "bfloat16", one.way, tokens, one.flops_per_token, sustained)
        return tp.exposed_stream_s + tp.activation_io_s

    for e, n in ((one, 1), (two, 2), (three, 3)):
        per_task = [
            sum(chunk_s(sum(v[i::n])) for v in shards.values() if v[i::n]) for i in range(n)
        ]
        assert e.layered_overhead_hours == pytest.approx(sum(per_task) / 3600)
        assert e.layered_overhead_wall_hours == pytest.approx(max(per_task) / 3600)
        assert e.compute_hours == pytest.approx(one.compute_hours)  # the work does not grow
        assert e.on_demand_hours == pytest.approx(
            e.compute_hours + e.layered_overhead_hours + n * e.setup_hours
        )
    # 2, 3 then 4 chunks, each streaming ~140 GB: the overhead grows with N
    assert one.layered_overhead_hours < two.layered_overhead_hours < three.layered_overhead_hours
    assert three.layered_overhead_hours > 1.9 * one.layered_overhead_hours
    assert three.wall_hours < one.wall_hours  # yet the wall time shrinks

    # preemption: a layered preemption loses the chunk in flight, scaled from the 15%
    assert one.preemption > 0.15
    assert one.spot_hours == pytest.approx(one.on_demand_hours * (1 + one.preemption))
    rows = dict(one.assumptions())
    assert "loses the chunk in flight" in rows["preemption overhead (spot)"]
    assert "teacher.chunk_tokens" in rows["preemption overhead (spot)"]
    # a chunk of 1/3 the tokens: more chunks (more streaming), less lost per preemption
    small = estimate_cost(load_job(make_job(tmp_path, big, batch_tokens=2048, chunk_tokens=1500)))
    assert small.layered.chunk_tokens <= 1500 < one.layered.chunk_tokens
    assert small.layered_overhead_hours > one.layered_overhead_hours
    assert small.preemption < one.preemption


def test_cli_vms_and_the_batch_jobs_default(tiny_teacher_dir, tmp_path):
    """cost-estimate --vms N prices N VMs; without it a batch job's cloud.vms, else 1."""
    from typer.testing import CliRunner

    from distill.cli import app

    path = make_job(tmp_path, tiny_teacher_dir)  # train: 3 shards, eval: 1

    def vms(*args: str, job: Path = path) -> int:
        out = tmp_path / "c.json"
        cmd = ["cost-estimate", "--job", str(job), "--json", str(out), *args]
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 0, r.output
        return json.loads(out.read_text())["vms"]

    assert vms() == 1 and vms("--vms", "2") == 2
    batch = tmp_path / "batch.toml"
    batch.write_text(path.read_text() + '\n[cloud]\nengine = "batch"\nvms = 2\n')
    assert vms(job=batch) == 2  # as teacher-cloud would run it
    assert vms("--vms", "3", job=batch) == 3 and vms("--vms", "1", job=batch) == 1


# --- sampled counts (distill/cloud/sampling.py): within their stated bound of the exact ones --


def test_sampled_demo_counts_are_within_their_bound_of_exact(smol_tokenizer):
    """jobs/demo.toml, its train split sampled (300 of 879 lines), against the full count."""
    job = load_job(REPO / "jobs" / "demo.toml")
    exact = count_data(job, smol_tokenizer)
    est = estimate_data(job, smol_tokenizer, sample_lines=300)
    s = est.sampled["train"]
    assert set(est.sampled) == {"train"} and (s.sampled, s.lines, s.skipped) == (300, 879, 0)
    for name in BOUNDED:
        assert abs(getattr(est, name) - getattr(exact, name)) <= est.bound(name), name
    assert est.bound("tokens") > 0 and est.bound("padded_tokens") > 0
    # lines are counted, not sampled: the samples and shards are exact (progress totals)
    assert (est.samples, est.shards, est.bound("samples")) == (exact.samples, exact.shards, 0)
    assert len(est.shard_tokens["train"]) == len(exact.shard_tokens["train"])
    assert est.per_split["eval"] == exact.per_split["eval"]  # 98 lines: counted exactly
    assert s.padding == pytest.approx(exact.padded_tokens / exact.tokens, rel=0.01)
    # fewer lines than the default sample: counted exactly, the same numbers as --exact
    assert estimate_data(job, smol_tokenizer) == exact and exact.exact


def synthetic_split(path: Path, n: int, seed: int = 0) -> np.ndarray:
    """``n`` lines drawn at random from the demo's train lines; which ones (their indices)."""
    demo = (REPO / "data" / "demo" / "train.jsonl").read_text().splitlines()
    pick = np.random.default_rng(seed).integers(0, len(demo), n)
    path.write_text("\n".join(demo[i] for i in pick) + "\n")
    return pick


def reference_counts(tokenizer, pick: np.ndarray, per: int = 16, budget: int = 512) -> dict:
    """The exact counts of a synthetic split, tokenising each distinct demo line once (as
    make_job's data section: max_length 128, truncated right) and replaying the shards."""
    from distill.data.dataset import tokenize_file
    from distill.teacher.batching import token_budget_batches

    demo = tokenize_file(REPO / "data" / "demo" / "train.jsonl", tokenizer, 128, "right")
    lengths = np.array([len(s.input_ids) for s in demo])[pick]
    targets = np.array([s.n_targets for s in demo])[pick]
    padded = ctx = 0
    for lo in range(0, len(pick), per):
        chunk = lengths[lo : lo + per].tolist()
        for b in token_budget_batches(chunk, budget):
            padded += len(b) * chunk[b[0]]
            ctx += len(b) * chunk[b[0]] ** 2
    return {
        "samples": len(pick),
        "tokens": int(lengths.sum()),
        "target_tokens": int(targets.sum()),
        "padded_tokens": padded,
        "attention_token_ctx": ctx,
    }


def test_a_large_split_is_sampled_in_seconds_within_its_bound(
    tiny_teacher_dir, smol_tokenizer, tmp_path
):
    """300,000 lines (~19M tokens; the full count takes minutes): 2,000 of them sampled."""
    job = load_job(make_job(tmp_path, tiny_teacher_dir))
    ref = reference_counts(smol_tokenizer, synthetic_split(tmp_path / "train.jsonl", 300_000))
    start = time.monotonic()
    est = estimate_data(job, smol_tokenizer, sample_lines=2000)
    took = time.monotonic() - start
    assert took < 30, took  # ~2 s here: one pass over 70 MB and 2,000 lines tokenised
    s = est.sampled["train"]
    assert (s.sampled, s.lines, s.skipped) == (2000, 300_000, 0) and "eval" not in est.sampled
    evals = DataCounts()
    count_split(evals, job, "eval", job.resolve(job.data.eval), smol_tokenizer)
    for name in BOUNDED:
        train = getattr(est, name) - getattr(evals, name)
        assert abs(train - ref[name]) <= s.bounds[name], (name, train, ref[name], s.bounds)
        assert s.bounds[name] <= 0.05 * ref[name] or name == "samples"
    assert est.per_split["train"]["samples"] == 300_000 and s.bounds["samples"] == 0
    sizes = est.shard_tokens["train"]
    assert len(sizes) == 300_000 // 16 and sum(sizes) == pytest.approx(ref["tokens"], rel=0.05)


def test_exact_counts_every_line_as_before(tiny_teacher_dir, smol_tokenizer, tmp_path):
    """--exact (sample_lines 0) is the full count (count_data's), equal to the reference
    method above; the same file sampled stays within its bound."""
    job = load_job(make_job(tmp_path, tiny_teacher_dir))
    ref = reference_counts(smol_tokenizer, synthetic_split(tmp_path / "train.jsonl", 2000, 1))
    exact = estimate_data(job, smol_tokenizer, sample_lines=0)
    assert exact.exact and exact.per_split["eval"]["samples"] == 10
    train = exact.per_split["train"]
    assert train == {k: ref[k] for k in train} and len(exact.shard_tokens["train"]) == 125
    est = estimate_data(job, smol_tokenizer, sample_lines=300)
    assert est.sampled["train"].sampled == 300
    for name in BOUNDED:
        assert abs(getattr(est, name) - getattr(exact, name)) <= est.bound(name), name


def test_invalid_sampled_lines_are_refused_or_left_out(tiny_teacher_dir, smol_tokenizer, tmp_path):
    """data.on_invalid = "error": a bad line in the sample refuses the file, naming the lines
    and the sample; "skip": the lines without a sample are extrapolated too."""
    path = make_job(tmp_path, tiny_teacher_dir)
    lines = (REPO / "data" / "demo" / "train.jsonl").read_text().splitlines()[:400] * 5
    lines[7::10] = ["not json"] * 200  # 1,800 samples in 2,000 lines
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DistillError, match="invalid lines") as e:
        estimate_data(load_job(path), smol_tokenizer, sample_lines=300)
    assert "malformed JSON" in str(e.value) and "in a sample of 300 of its 2,000 lines" in str(
        e.value
    )

    job = load_job(path, ['data.on_invalid="skip"'])
    exact = count_data(job, smol_tokenizer)
    est = estimate_data(job, smol_tokenizer, sample_lines=300)
    assert exact.per_split["train"]["samples"] == 1800 and est.sampled["train"].skipped > 0
    assert est.bound("samples") > 0
    for name in BOUNDED:
        assert abs(getattr(est, name) - getattr(exact, name)) <= est.bound(name), name


def test_cli_sampled_table_and_json_carry_the_bound(tiny_teacher_dir, tmp_path, monkeypatch):
    from rich.console import Console
    from typer.testing import CliRunner

    from distill.cli import app

    path = make_job(tmp_path, tiny_teacher_dir)  # 40 train lines, 10 eval
    buf = io.StringIO()
    monkeypatch.setattr("distill.cli.out", Console(file=buf, width=300))

    def run(*args: str) -> tuple[str, dict]:
        buf.seek(0)
        buf.truncate()
        out = tmp_path / "c.json"
        r = CliRunner().invoke(
            app, ["cost-estimate", "--job", str(path), "--json", str(out), *args]
        )
        assert r.exit_code == 0, r.output
        return buf.getvalue(), json.loads(out.read_text())

    table, js = run("--sample-lines", "10")
    assert "train: sampled 10 of 40 lines; eval: exact" in table and "95% confidence" in table
    d = js["data"]
    assert d["exact"] is False and d["sampled"]["train"]["sampled"] == 10
    assert d["sampled"]["train"]["lines"] == 40 and d["bounds"]["tokens"] > 0
    assert f"{d['tokens']:,} ± {d['bounds']['tokens']:,}" in table
    lo, hi = js["usd_range"]["total_spot"]
    assert lo < js["usd"]["total_spot"] < hi and "95%:" in table
    assert "assumption: data counts" in table and "sample variance" in table

    table, js = run()  # 40 lines: fewer than the sample, counted
    assert js["data"]["exact"] is True and js["usd_range"] == {}
    assert set(js["data"]["bounds"].values()) == {0} and "±" not in table
    assert "exact: every line tokenised" in table
    _, exact = run("--exact")
    assert exact["data"] == js["data"] and exact["options"]["sample_lines"] == 0

    r = CliRunner().invoke(
        app, ["cost-estimate", "--job", str(path), "--exact", "--sample-lines", "5"]
    )
    assert isinstance(r.exception, DistillError) and "not both" in str(r.exception)


@pytest.mark.parametrize("form", ["gz", "zst", "parquet", "dir", "gs"])
def test_every_format_is_sampled_within_its_bound(
    form, tiny_teacher_dir, smol_tokenizer, tmp_path, request
):
    """A compressed file, Parquet, a directory and a gs:// split are sampled record by record
    (only the sample tokenised) and stay within their bound of the exact count; a sample of
    the same size on the plain file gives the same kind of answer."""
    import gzip

    import zstandard

    from distill.cloud import sampling

    job_path = make_job(tmp_path, tiny_teacher_dir)
    pick = synthetic_split(tmp_path / "all.jsonl", 3000, 2)
    raw = (tmp_path / "all.jsonl").read_bytes()
    lines = raw.splitlines(keepends=True)
    if form == "gz":
        train = tmp_path / "train.jsonl.gz"
        train.write_bytes(gzip.compress(raw))
    elif form == "zst":
        train = tmp_path / "train.jsonl.zst"
        train.write_bytes(zstandard.ZstdCompressor().compress(raw))
    elif form == "parquet":
        from test_formats import write_parquet

        train = write_parquet(tmp_path / "train.parquet", [json.loads(x) for x in lines], 500)
    elif form == "dir":
        train = tmp_path / "parts"
        train.mkdir()
        (train / "a.jsonl").write_bytes(b"".join(lines[:1000]))
        (train / "b.jsonl").write_bytes(b"".join(lines[1000:]))
    else:
        from distill.store.storage import open_store

        bucket = request.getfixturevalue("gcs_bucket")
        open_store(f"{bucket}/data").put_bytes("train.jsonl", raw)
        train = f"{bucket}/data/train.jsonl"
    job = load_job(job_path, [f'data.train="{train}"'])
    tokenised = []
    real = sampling.encode_block

    def spy(tokenizer, block, *a):
        tokenised.append(len(block))
        return real(tokenizer, block, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling, "encode_block", spy)
        est = estimate_data(job, smol_tokenizer, sample_lines=300)
    assert tokenised == [300]  # the train split's sample only (eval is counted exactly)
    s = est.sampled["train"]
    assert (s.sampled, s.lines) == (300, 3000)
    ref = reference_counts(smol_tokenizer, pick)
    evals = DataCounts()
    count_split(evals, job, "eval", job.resolve(job.data.eval), smol_tokenizer)
    for name in BOUNDED:
        train_est = getattr(est, name) - getattr(evals, name)
        assert abs(train_est - ref[name]) <= s.bounds[name], (name, train_est, ref[name])
    assert est.per_split["train"]["samples"] == 3000 and s.bounds["samples"] == 0


def test_the_estimate_counts_what_targets_alignment_adds(tiny_teacher_dir, tmp_path):
    """targets.alignment (#24): the probe's samples carry no offsets, so the estimate adds
    the actual token's float16 log-prob per target position and the measured offset bytes
    per token; a reference run without alignment is not taken for a job with it."""
    from distill.cloud.shard_bytes import (
        ALIGN_BYTES_PER_TARGET,
        ALIGN_BYTES_PER_TOKEN,
        reference_bytes_per_target,
    )
    from distill.teacher.run import run_teacher

    path = make_job(tmp_path, tiny_teacher_dir)
    plain = estimate_cost(load_job(path))
    aligned = estimate_cost(load_job(path, ["targets.alignment=true"]))
    extra = ALIGN_BYTES_PER_TARGET * plain.data.target_tokens
    extra += ALIGN_BYTES_PER_TOKEN * plain.data.tokens
    assert aligned.shard_bytes - plain.shard_bytes == pytest.approx(extra, abs=2)
    assert "targets.alignment" in aligned.bytes_basis
    run_teacher(load_job(path))  # a plain reference run in job.output
    assert reference_bytes_per_target(load_job(path).output, load_job(path)) is not None
    aligned_job = load_job(path, ["targets.alignment=true"])
    assert reference_bytes_per_target(aligned_job.output, aligned_job) is None
