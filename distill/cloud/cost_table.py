"""``cost-estimate``'s output: the table (numbers, then every assumption as a row) and the
JSON file (:func:`write_estimate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.cloud.counting import DataCounts
from distill.cloud.l4 import L4_NAME, L4_PEAK_FLOPS, l4_usable_bytes
from distill.cloud.prices import NAT_CAP_VMS
from distill.cloud.pricing import (
    ASSUMED_UPLINK_BYTES_PER_S,
    DATA_READ_RECORDS_PER_S,
    DEFAULT_PREP_TOKENS_PER_S,
    DRIVER_DOWNLOAD_GIB,
    HUB_DOWNLOAD_BYTES_PER_S,
)
from distill.cloud.sampling import SAMPLE_BYTES, SEED
from distill.cloud.spec import BOOT_DISK_TYPE
from distill.errors import DistillError
from distill.teacher.fit import GIB, HOST_LINK_BYTES_PER_S, WEIGHTS_STREAM_BYTES_PER_S

if TYPE_CHECKING:
    from distill.cloud.calibration import Calibration
    from distill.cloud.cost import CostEstimate


def render_table(e: CostEstimate) -> Any:
    """A rich table: the numbers, then every assumption as a row."""
    from rich.table import Table

    t = Table(title=f"teacher pass cost: job {e.job} on {e.tasks} x L4 ({e.prices.region})")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_column("how")
    d, pr = e.data, e.profile
    mem = sum(e.memory.values())
    rows = [
        ("data", "exact" if d.exact else "sampled", sample_text(d)),
        (
            "samples",
            _counted(d, "samples"),
            ", ".join(f"{k} {v['samples']:,}" for k, v in d.per_split.items()),
        ),
        ("tokens", _counted(d, "tokens"), "teacher tokenizer, all splits"),
        (
            "target tokens",
            _counted(d, "target_tokens"),
            "positions whose next token is assistant's",
        ),
        ("padded tokens", _counted(d, "padded_tokens"), "the teacher's token-budget batches"),
        (
            "teacher params",
            f"{pr.params / 1e6:,.1f} M",
            f"{pr.non_embedding_params / 1e6:,.1f} M non-embedding (meta device)",
        ),
        ("FLOPs per token", f"{e.flops_per_token:.3g}", f"total {e.flops:.3g}"),
        ("teacher mode", e.way.label(), f"teacher.mode = {e.mode_setting!r}"),
        ("GPU memory", f"{mem / GIB:.2f} GiB", f"of {l4_usable_bytes() / GIB:.1f} GiB usable"),
        *_layered_rows(e),
        (
            "throughput",
            f"{e.tokens_per_s:,.0f} tok/s",
            f"MFU {e.mfu:.2f}" + _mfu_note(e.calibration),
        ),
        ("compute hours", hours_text(e.compute_hours), ""),
        (
            "setup hours",
            hours_text(e.setup_hours),
            f"per VM; of it, the data preparation {_seconds(e.prep_hours * 3600)}",
        ),
        (
            "hours on-demand",
            hours_text(e.on_demand_hours),
            f"VM-hours of all {e.tasks} VMs" if e.tasks > 1 else "",
        ),
        ("hours spot", hours_text(e.spot_hours), f"+{e.preemption:.0%} preemption"),
        (
            "wall time (spot)",
            hours_text(e.wall_hours),
            f"{e.tasks} VM(s) at once: the busiest VM's setup + shards (+ layered overhead) "
            "+ preemption",
        ),
        (
            "$ VM spot",
            _usd(e.usd["vm_spot"]),
            f"${e.prices.vm_spot_per_hour:.3f}/h as of {e.prices.as_of}: spot prices change "
            "(up to once a day); --prices FILE to use today's",
        ),
        ("$ VM on-demand", _usd(e.usd["vm_on_demand"]), ""),
        ("$ boot disk", _usd(e.usd["disk_spot"]), "spot hours"),
        ("shard bytes", f"{e.shard_bytes / GIB:.3f} GB", ""),
        ("$ storage", _usd(e.usd["storage"]), f"{e.storage_gb_months:.3f} GB-months"),
        ("$ egress", _usd(e.usd["egress"]), f"{e.egress_gb:.3f} GB"),
        ("$ network (Cloud NAT)", _usd(e.usd["nat_spot"]), f"spot hours, {e.nat_gb:.2f} GB"),
        ("teacher weights", f"{e.weights.bytes / 1e9:,.2f} GB", weights_text(e)),
        ("$ teacher weights", _usd(e.usd["weights"]), weights_usd_text(e)),
        (
            "$ total (spot)",
            _usd(e.usd["total_spot"]),
            "VM + disk + NAT + storage + egress + weights" + _usd_range(e, "total_spot"),
        ),
        ("$ total (on-demand)", _usd(e.usd["total_on_demand"]), _usd_range(e, "total_on_demand")),
    ]
    for r in rows:
        t.add_row(*r)
    t.add_section()
    for name, value in e.assumptions():
        t.add_row(f"assumption: {name}", "", value)
    return t


def sample_text(d: DataCounts) -> str:
    """How the counts were found: "exact", or "sampled N of M lines" per split."""
    if d.exact:
        return "exact: every line tokenised"
    parts = [f"{k}: sampled {s.sampled:,} of {s.lines:,} lines" for k, s in d.sampled.items()]
    parts += [f"{k}: exact" for k in d.per_split if k not in d.sampled]
    return "; ".join(parts) + "; ± is the 95% confidence interval"


def _counted(d: DataCounts, name: str) -> str:
    b = d.bound(name)
    return f"{getattr(d, name):,}" + (f" ± {b:,}" if b else "")


def _usd_range(e: CostEstimate, key: str) -> str:
    if key not in e.usd_range:
        return ""
    lo, hi = e.usd_range[key]
    return f"{'; ' if key == 'total_spot' else ''}95%: {_usd(lo)} to {_usd(hi)} (sampled counts)"


def _data_rows(e: CostEstimate) -> list[tuple[str, str]]:
    d, o = e.data, e.opts
    if d.exact:
        why = (
            "--exact"
            if o.sample_lines == 0
            else f"each split fits the sample: --sample-lines {o.sample_lines:,}, "
            f"{SAMPLE_BYTES / 2**20:g} MiB"
        )
        return [
            (
                "data counts",
                "exact: every line tokenised with the teacher's tokenizer and replayed through "
                f"the teacher's shards and token-budget batches ({why})",
            )
        ]
    ratios = ", ".join(f"{k} {s.padding:.4f}" for k, s in d.sampled.items())
    return [
        (
            "data counts",
            f"sampled: each split's lines counted in one pass over its bytes; a uniform sample "
            f"of them (seed {SEED}, --sample-lines {o.sample_lines:,}, at most "
            f"{SAMPLE_BYTES / 2**20:g} MiB of text a split) tokenised as the teacher does; "
            "each count = lines x the sample's mean per line, ± 1.96 x lines x "
            "sqrt((1 - n/lines) x s²/n), s² the sample variance per line (95% confidence "
            "interval, normal approximation); a split of fewer lines is counted exactly; "
            "--exact tokenises every line",
        ),
        (
            "padding",
            f"padded tokens = tokens x the padding ratio of the sample's own token-budget "
            f"batches ({ratios}; its samples in file order, teacher.samples_per_shard a "
            "shard), attention context likewise; the bound covers the sampling, not how "
            "those batches differ from the real shards'; shard sizes: the mean tokens of the "
            "sampled samples near each shard; the $ totals' 95% range prices every count at "
            "its bound's end at once",
        ),
    ]


def _layered_rows(e: CostEstimate) -> list[tuple[str, str, str]]:
    tp = e.layered
    if tp is None:
        return []
    return [
        ("host memory", f"{e.way.host / GIB:.2f} GiB", "layered: the chunk's activations"),
        (
            "weight streaming",
            f"{tp.stream_share:.1%} of time",
            f"{tp.stream_s:,.0f} s per chunk of {tp.chunk_tokens:,} tokens, "
            f"{tp.exposed_stream_s:,.0f} s not hidden by prefetch "
            f"(compute {tp.compute_s:,.0f} s, activation I/O {tp.activation_io_s:,.0f} s)",
        ),
        (
            "layered overhead hours",
            hours_text(e.layered_overhead_hours),
            f"every chunk of each VM's shards; in VM-hours (all {e.tasks} VMs), the busiest "
            f"VM's {hours_text(e.layered_overhead_wall_hours)} h in the wall time",
        ),
    ]


def _mfu_note(cal: Calibration | None) -> str:
    if cal is None:
        return ", uncalibrated"
    return "" if cal.on_l4 else f", measured on {cal.gpu}, scaled by the FLOP ratio"


def assumption_rows(e: CostEstimate) -> list[tuple[str, str]]:
    """(assumption, value and source) rows, every one stated."""
    p, o = e.prices, e.opts
    peak = L4_PEAK_FLOPS[e.dtype]
    if e.calibration:
        cal = e.calibration
        mfu = (
            f"{e.mfu:.3f}, calibrated: {cal.model} at {cal.tokens_per_s:,.0f} tokens/s "
            f"on {cal.gpu} ({cal.path})"
        )
        if not cal.on_l4:
            mfu += (
                f"; measured on {cal.gpu}, not an L4: scaled to the L4 by the FLOP ratio "
                f"({peak / 1e12:.1f} / {cal.peak_flops / 1e12:.1f} TFLOP/s dense peak), "
                "i.e. the same MFU is assumed"
            )
    else:
        mfu = f"{e.mfu:.2f} ({'--mfu' if o.mfu is not None else 'assumed'}; uncalibrated)"
    return [
        *_data_rows(e),
        ("GPU", f"1 x {L4_NAME}, {peak / 1e12:.1f} TFLOP/s dense {e.dtype} peak (datasheet)"),
        ("MFU (model FLOPs utilisation)", mfu),
        (
            "FLOPs formula",
            "padded tokens x (2 x non-embedding params + 2 x layers x ctx x d_attn) "
            "+ target tokens x 2 x hidden x vocab (LM head only at target positions)",
        ),
        (
            "setup",
            f"{o.setup_minutes:g} min boot/driver/image pull + the {e.dtype} checkpoint "
            f"read at {WEIGHTS_STREAM_BYTES_PER_S / 1e6:.0f} MB/s + the data preparation: "
            f"every record read at {DATA_READ_RECORDS_PER_S:,.0f}/s, the VM's share of the "
            f"tokens checked and tokenised at {o.prep_tokens_per_s:,.0f}/s"
            + (
                " (bench/data_scale.py's 2-vCPU rate scaled to 8 vCPUs; --prep-tokens-per-s)"
                if o.prep_tokens_per_s == DEFAULT_PREP_TOKENS_PER_S
                else " (--prep-tokens-per-s)"
            ),
        ),
        (
            "VMs",
            f"{e.tasks} (--vms {o.vms}): VM i computes the shards s % {e.tasks} == i, "
            "each VM pays its own setup; wall time is the busiest VM's",
        ),
        ("preemption overhead (spot)", _preemption_basis(e)),
        *(
            [
                (
                    "layered pass",
                    f"weights read at {WEIGHTS_STREAM_BYTES_PER_S / 1e6:.0f} MB/s once per "
                    "chunk, prefetched under the previous layer's compute; activations cross "
                    f"the host link at {HOST_LINK_BYTES_PER_S / 1e9:.0f} GB/s twice per layer; "
                    "each VM's chunks are its own shards of each split, chunk_tokens at most",
                )
            ]
            if e.layered
            else []
        ),
        ("prices", f"as of {p.as_of}; {p.source}"),
        ("price sources", "; ".join(f"{group}: {basis}" for group, basis in p.basis.items())),
        ("machine", f"{p.machine}, {p.region}"),
        (
            "VM price",
            f"spot ${p.vm_spot_per_hour:.3f}/h, on-demand ${p.vm_on_demand_per_hour:.3f}/h",
        ),
        (
            "boot disk",
            f"{o.boot_disk_gb} GB {BOOT_DISK_TYPE} at ${p.boot_disk_per_gb_month}/GB-month",
        ),
        ("shard bytes", e.bytes_basis),
        (
            "storage",
            f"GCS Standard ${p.storage_per_gb_month}/GB-month, kept {o.storage_months:g} "
            "month(s); operations not counted",
        ),
        (
            "egress",
            f"internet ${p.egress_per_gb}/GB, {o.downloads} full download(s) by the "
            "student; free tier not counted",
        ),
        (
            "network",
            f"Cloud NAT ${p.nat_per_vm_hour}/VM-hour (${p.nat_max_per_hour}/h above "
            f"{NAT_CAP_VMS} VMs) + ${p.nat_per_gb}/GB processed: "
            + (
                f"each Batch VM boot downloads the NVIDIA driver (~{DRIVER_DOWNLOAD_GIB} GB)"
                if o.engine == "batch"
                else "the single VM's driver comes from Google (no NAT traffic)"
            ),
        ),
        ("GB", "2^30 bytes, as Google bills"),
    ]


def _preemption_basis(e: CostEstimate) -> str:
    base = f"{e.opts.preemption_overhead:.0%} of hours (work since the last shard + re-setup)"
    if e.layered is None:
        return base
    return (
        f"{e.preemption:.0%}: layered, a preemption loses the chunk in flight "
        f"(up to {hours_text(e.layered.seconds / 3600)} h), not a shard, so {base} is scaled "
        "by (setup + chunk / 2) / (setup + shard / 2); on Spot a smaller "
        "teacher.chunk_tokens loses less (and streams the weights more often)"
    )


def write_estimate(e: CostEstimate, path: Path) -> None:
    """``cost-estimate --json PATH``: the numbers as JSON (:meth:`CostEstimate.to_dict`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(e.to_dict(), indent=2) + "\n")
    except OSError as err:
        raise DistillError(f"--json {path}: cannot write ({err.strerror})") from None


def _usd(x: float) -> str:
    return f"{x:,.2f}" if x >= 0.995 else f"{x:.4f}"


def weights_text(e: CostEstimate) -> str:
    """How the checkpoint reaches the VMs, and the time it takes."""
    w = e.weights
    if w.kind == "hf":
        return (
            f"copied from the Hub into the run's bucket once, by the first VM, through Cloud NAT: "
            f"about {_seconds(w.copy_hours * 3600)} at {HUB_DOWNLOAD_BYTES_PER_S / 1e6:,.0f} MB/s "
            "(assumed; every VM waits for it: in the setup); the VMs read the bucket copy"
        )
    if w.kind == "local":
        return (
            "uploaded from this machine into the run's bucket before any VM starts: about "
            f"{_seconds(w.upload_hours * 3600)} at an assumed "
            f"{ASSUMED_UPLINK_BYTES_PER_S * 8 / 1e6:,.0f} Mbit/s (an hf: or gs:// teacher "
            "never passes through this machine)"
        )
    if w.kind == "gs":
        return "read by every VM from its bucket folder: nothing copied (same region: free)"
    return "built into the teacher image"


def weights_usd_text(e: CostEstimate) -> str:
    w, o, p = e.weights, e.opts, e.prices
    parts = []
    if w.stored_gb:
        parts.append(
            f"its copy in the bucket: {w.stored_gb:,.2f} GB x {o.storage_months:g} month(s) x "
            f"${p.storage_per_gb_month}/GB-month"
        )
    if w.nat_gib:
        parts.append(f"{w.nat_gib:,.2f} GB through Cloud NAT once x ${p.nat_per_gb}/GB")
    return "; ".join(parts) or "nothing moved or stored by the run"


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.2f} s" if s < 1 else f"{s:.1f} s"
    return f"{s / 60:,.1f} min"


def hours_text(h: float) -> str:
    """Hours as the table prints them (minutes too below 10 h)."""
    return f"{h:,.2f}" if h >= 10 else f"{h:.3f} ({h * 60:,.1f} min)"
