"""The price and hours model without a tokenizer, the L4 data file, and --prices overrides."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from distill.cloud import cost
from distill.cloud.counting import DataCounts
from distill.cloud.l4 import plan_l4
from distill.cloud.prices import PRICE_NUMBERS, load_prices, price_groups
from distill.cloud.pricing import (
    DATA_READ_RECORDS_PER_S,
    DEFAULT_PREP_TOKENS_PER_S,
    CostOptions,
    data_prep_hours,
    nat_gib,
    nat_usd,
    pass_hours,
    priced,
)
from distill.config import Job
from distill.errors import DistillError
from distill.hardware import DATA_FILE, l4, read_data

REPO = Path(__file__).resolve().parents[1]


def test_the_pure_model_needs_no_tokenizer(monkeypatch):
    """pass_hours and priced on hand-made counts and a profile from a transformers config
    object (as bench/fanout.py's scenario), against the arithmetic written out."""
    from transformers import LlamaConfig

    import distill.models
    from distill.teacher.fit import teacher_profile

    def no(*args, **kwargs):
        raise AssertionError("the price model tokenised or loaded a model")

    monkeypatch.setattr(distill.models, "load_tokenizer", no)
    monkeypatch.setattr(distill.models, "resolve_model", no)
    monkeypatch.setattr("distill.cloud.counting.count_data", no)

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    p = teacher_profile(config)
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q k v o, MLP, 2 norms
    non_embed = 2 * layer + 64  # + final norm
    assert (p.non_embedding_params, p.params) == (non_embed, non_embed + 2 * 1000 * 64)

    tokens, targets, padded, length = 512_000, 256_000, 530_000, 512
    data = DataCounts(
        samples=1000,
        shards=4,  # 256 samples a shard (the default job's)
        tokens=tokens,
        target_tokens=targets,
        padded_tokens=padded,
        attention_token_ctx=padded * length,
        per_split={
            "train": {
                "samples": 1000,
                "tokens": tokens,
                "target_tokens": targets,
                "padded_tokens": padded,
            }
        },
    )
    job = Job()  # bfloat16, samples_per_shard 256, teacher.mode "auto"
    way = plan_l4(job, p)
    assert way.mode == "resident"
    opts = CostOptions(vms=2, engine="batch")
    h = pass_hours(job, p, way, data, 121e12 * 0.35, opts)

    flops = 2 * non_embed * padded + 2 * 2 * 64 * padded * length + 2 * 64 * 1000 * targets
    compute = flops / (121e12 * 0.35) / 3600
    # 10 min + the bf16 checkpoint at 200 MB/s + the data preparation: every record read,
    # the busiest VM's 2 of 4 shards' tokens tokenised
    prep = (1000 / DATA_READ_RECORDS_PER_S + tokens * 2 / 4 / DEFAULT_PREP_TOKENS_PER_S) / 3600
    setup = 10 / 60 + p.params * 2 / 200e6 / 3600 + prep
    assert h.prep == pytest.approx(prep)
    assert h.flops == pytest.approx(flops, rel=1e-12)
    assert (h.tasks, h.layered, h.overhead, h.preemption) == (2, None, 0.0, 0.15)
    assert h.compute == pytest.approx(compute) and h.setup == pytest.approx(setup)
    assert h.on_demand == pytest.approx(compute + 2 * setup)
    assert h.spot == pytest.approx((compute + 2 * setup) * 1.15)
    assert h.wall == pytest.approx((setup + compute * 2 / 4) * 1.15)  # VM 0: 2 of 4 shards

    prices = load_prices(None)
    gib = nat_gib(opts, h.tasks, h.preemption)
    assert gib == pytest.approx(0.5 * 2 * 1.15)  # the driver, once per Batch VM boot
    nat = nat_usd(prices, h.spot, h.wall, h.tasks, gib)
    assert nat == pytest.approx(h.spot * 0.0014 + gib * 0.045)
    usd = priced(prices, opts, h.spot, h.on_demand, 2.0, 3.0, (nat, 0.0))
    assert usd["vm_spot"] == pytest.approx(h.spot * 0.34)
    assert usd["vm_on_demand"] == pytest.approx(h.on_demand * 0.85)
    assert usd["disk_spot"] == pytest.approx(h.spot * 100 * 0.10 / 730)
    assert (usd["storage"], usd["egress"]) == pytest.approx((2.0 * 0.020, 3.0 * 0.12))
    total = h.spot * (0.34 + 100 * 0.10 / 730) + nat + 2.0 * 0.020 + 3.0 * 0.12
    assert usd["total_spot"] == pytest.approx(total)


def test_every_vm_pays_its_data_preparation():
    """Setup includes the data preparation: every record read (one process) and the VM's share
    of the tokens tokenised at the assumed rate (overridable); on N VMs the tokens' part
    shrinks as the busiest VM's share, the records' part does not."""
    samples, tokens = 2_000_000, 1_000_000_000
    data = DataCounts(samples=samples, tokens=tokens)
    one = data_prep_hours(data, 1.0, DEFAULT_PREP_TOKENS_PER_S)
    assert one * 3600 == pytest.approx(
        samples / DATA_READ_RECORDS_PER_S + tokens / DEFAULT_PREP_TOKENS_PER_S
    )
    hundred = data_prep_hours(data, 1 / 100, DEFAULT_PREP_TOKENS_PER_S)
    assert hundred * 3600 == pytest.approx(
        samples / DATA_READ_RECORDS_PER_S + tokens / 100 / DEFAULT_PREP_TOKENS_PER_S
    )
    assert one / 100 < hundred < one
    twice = data_prep_hours(data, 1.0, 2 * DEFAULT_PREP_TOKENS_PER_S)
    assert (one - twice) * 3600 == pytest.approx(tokens / DEFAULT_PREP_TOKENS_PER_S / 2)
    # the rates: measured on 2 vCPUs by bench/data_scale.py, the tokens' scaled to 8
    m = l4().machine
    assert (
        m.data_read_records_per_s,
        m.data_prep_tokens_per_s,
    ) == (DATA_READ_RECORDS_PER_S, DEFAULT_PREP_TOKENS_PER_S)
    assert CostOptions().prep_tokens_per_s == DEFAULT_PREP_TOKENS_PER_S > 0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(DistillError, match="--prep-tokens-per-s must be > 0"):
            CostOptions(prep_tokens_per_s=bad).validate()


def test_the_teacher_weights_are_priced_where_they_come_from():
    """hf: copied Hub -> bucket once (NAT GiB once, stored, every VM waits for the copy); a
    local directory uploaded from this machine (stored, no VM time); gs://: nothing."""
    from distill.cloud.pricing import (
        ASSUMED_UPLINK_BYTES_PER_S,
        HUB_DOWNLOAD_BYTES_PER_S,
        checkpoint_move,
        weights_usd,
    )

    n = 15_230_000_000  # a 7B teacher in bf16
    prices = load_prices(None)
    hf = checkpoint_move("hf:Qwen/Qwen2.5-7B-Instruct@" + "a" * 40, n)
    assert hf.copy_hours * 3600 == pytest.approx(n / HUB_DOWNLOAD_BYTES_PER_S)
    assert hf.nat_gib == hf.stored_gb == pytest.approx(n / 2**30) and hf.upload_hours == 0
    assert weights_usd(prices, hf, 2.0) == pytest.approx(
        n / 2**30 * (2 * prices.storage_per_gb_month + prices.nat_per_gb)
    )
    local = checkpoint_move("/models/qwen-7b", n)
    assert local.upload_hours * 3600 == pytest.approx(n / ASSUMED_UPLINK_BYTES_PER_S)
    assert local.copy_hours == local.nat_gib == 0 and local.stored_gb == pytest.approx(n / 2**30)
    assert weights_usd(prices, local, 1.0) == pytest.approx(n / 2**30 * prices.storage_per_gb_month)
    for model in ("gs://b/ckpt@0123456789abcdef", "builtin:smollm2-135m-instruct"):
        move = checkpoint_move(model, n)
        assert (move.copy_hours, move.nat_gib, move.stored_gb, weights_usd(prices, move, 1)) == (
            0,
            0,
            0,
            0,
        )


def test_the_pure_model_imports_no_torch():
    code = (
        "import sys, distill.cloud.pricing, distill.cloud.prices, distill.cloud.cost;"
        "print([m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_data_file_holds_the_l4_vm_facts_and_dated_prices():
    from distill.cloud import spec
    from distill.teacher import fit

    facts = l4()
    assert facts.version == 1 and facts.gpu.name == "NVIDIA L4"
    assert cost.L4_PEAK_FLOPS == {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12}
    assert cost.L4_MEMORY_BYTES == 23_034 * 2**20 and cost.L4_VM_RAM_BYTES == 32 * 2**30
    assert (spec.MACHINE_TYPE, spec.MACHINE_VCPUS) == ("g2-standard-8", 8)
    assert (spec.ACCELERATOR_TYPE, spec.ACCELERATOR_COUNT) == ("nvidia-l4", 1)
    assert (spec.BOOT_DISK_TYPE, spec.BOOT_DISK_GB) == ("pd-balanced", 100)
    assert (fit.WEIGHTS_STREAM_BYTES_PER_S, fit.HOST_LINK_BYTES_PER_S) == (200e6, 12e9)
    assert (cost.HOURS_PER_MONTH, cost.NAT_CAP_VMS) == (730, 32)

    p = load_prices(None)
    assert (p.vm_on_demand_per_hour, p.vm_spot_per_hour) == (0.85, 0.34)
    assert (p.boot_disk_per_gb_month, p.storage_per_gb_month, p.egress_per_gb) == (
        0.10,
        0.020,
        0.12,
    )
    assert (p.nat_per_vm_hour, p.nat_max_per_hour, p.nat_per_gb) == (0.0014, 0.044, 0.045)
    assert p.as_of == "2026-11" and "verify before relying" in p.source
    assert "distill/hardware/l4.toml" in p.source
    # every price in exactly one group, and every group dated and sourced
    grouped = [k for keys in price_groups().values() for k in keys]
    assert sorted(grouped) == sorted(PRICE_NUMBERS)
    for name, group in facts.price_groups.items():
        assert len(group.as_of) == 7 and group.as_of[4] == "-" and group.source, name
        assert p.basis[name].startswith(f"as of {group.as_of}, ")
    # the names callers import from distill.cloud.cost still resolve
    assert all(hasattr(cost, name) for name in cost.__all__)


def test_the_data_file_is_read_from_the_installed_package(tmp_path):
    """A wheel built from pyproject.toml carries l4.toml, and the installed package reads it
    through importlib.resources (as the teacher image does: pip install .)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "distill", src / "distill", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    wheel = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
    r = subprocess.run([*wheel, str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp_path / "dist").glob("distill-*.whl")
    assert f"distill/hardware/{DATA_FILE}" in zipfile.ZipFile(whl).namelist()

    site = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(whl)]
    r = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    code = (
        "import json, distill.hardware as h, distill.cloud.prices as p;"
        "print(json.dumps([h.__file__, h.read_data(), p.load_prices(None).vm_spot_per_hour]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    where, data, spot = json.loads(r.stdout)
    assert Path(where).is_relative_to(site)
    assert data == json.loads(json.dumps(read_data())) and spot == 0.34


def test_prices_file_overriding_one_field_changes_only_that_field(tmp_path):
    base = load_prices(None)
    path = tmp_path / "prices.toml"
    path.write_text('as_of = "2027-02"\nnat_per_gb = 0.09\n')
    over = load_prices(path)
    changed = {
        f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(over, f.name)
    }
    assert changed == {"nat_per_gb", "as_of", "source", "basis"}  # the price, and its dating
    assert over.nat_per_gb == 0.09 and over.as_of == "2027-02" and str(path) in over.source
    assert over.basis == {**base.basis, "nat": f"as of 2027-02, {path}"}  # only its group's

    opts = CostOptions(engine="batch")
    before = priced(base, opts, 10.0, 8.0, 1.0, 1.0, (nat_usd(base, 10.0, 10.0, 1, 2.0), 0.0))
    after = priced(over, opts, 10.0, 8.0, 1.0, 1.0, (nat_usd(over, 10.0, 10.0, 1, 2.0), 0.0))
    moved = {k for k in before if before[k] != pytest.approx(after[k])}
    assert moved == {"nat_spot", "total_spot"}
    assert after["nat_spot"] - before["nat_spot"] == pytest.approx(2.0 * (0.09 - 0.045))
