"""The machine distill rents for the teacher pass, as data: ``l4.toml`` in this package.

One versioned file holds the NVIDIA L4's and the g2-standard-8's facts (peak FLOP/s, memory,
vCPUs, the disk, host-link and data-preparation rates the time models use), Google's billing
rules and the prices, each price group dated and sourced. It is package data read with
importlib.resources, so an installed wheel and the teacher image read the same file. Nothing
here imports torch; ``--prices FILE`` overrides prices (:mod:`distill.cloud.prices`).
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

DATA_FILE = "l4.toml"
DATA_PATH = f"distill/hardware/{DATA_FILE}"  # as the estimate names it
VERSION = 1  # the layout this module reads
_DATED = ("as_of", "source")  # a price group's keys that are not prices


@dataclass(frozen=True)
class Gpu:
    name: str  # as nvidia-smi names it
    accelerator_type: str  # Compute Engine's
    memory_bytes: int  # total, as nvidia-smi reports it
    peak_flops: dict[str, float]  # dense, per dtype
    source: str


@dataclass(frozen=True)
class Machine:
    type: str
    vcpus: int
    memory_bytes: int
    gpus: int
    boot_disk_type: str
    boot_disk_min_gb: int
    disk_read_bytes_per_s: float  # the checkpoint read: the load, layered weight streaming
    host_link_bytes_per_s: float  # activations host <-> GPU (layered)
    data_read_records_per_s: float  # a task's pass over every record of a split (one process)
    data_prep_tokens_per_s: float  # a task's own records checked and tokenised (every vCPU)
    hub_download_bytes_per_s: float  # an hf: teacher's copy, Hub -> the first VM (assumed)
    source: str


@dataclass(frozen=True)
class PriceGroup:
    as_of: str
    source: str
    prices: dict[str, float]  # USD, named as the fields of distill.cloud.prices.Prices


@dataclass(frozen=True)
class Facts:
    """The data file, typed."""

    version: int
    gpu: Gpu
    machine: Machine
    hours_per_month: float  # Google's billing month
    nat_cap_vms: int  # Cloud NAT charges per VM up to this many, then a flat rate
    region: str  # where the prices hold
    machine_label: str  # the priced machine, in words
    price_note: str
    price_groups: dict[str, PriceGroup]

    @property
    def prices_as_of(self) -> str:
        """The price table's date: its oldest group's."""
        return min(g.as_of for g in self.price_groups.values())


def read_data() -> dict[str, Any]:
    """The data file's tables, as the installed package holds it."""
    return tomllib.loads(files(__name__).joinpath(DATA_FILE).read_text(encoding="utf-8"))


@functools.cache
def l4() -> Facts:
    """The L4 VM's facts and prices (:data:`DATA_FILE`), read once."""
    raw = read_data()
    if raw.get("version") != VERSION:
        raise RuntimeError(f"{DATA_PATH}: version {raw.get('version')!r}, expected {VERSION}")
    g, m, b, p = raw["gpu"], raw["machine"], raw["billing"], raw["prices"]
    groups = {
        name: PriceGroup(
            t["as_of"], t["source"], {k: float(v) for k, v in t.items() if k not in _DATED}
        )
        for name, t in p.items()
        if isinstance(t, dict)
    }
    return Facts(
        version=raw["version"],
        gpu=Gpu(
            name=g["name"],
            accelerator_type=g["accelerator_type"],
            memory_bytes=g["memory_mib"] * 2**20,
            peak_flops={k: float(v) for k, v in g["peak_flops"].items()},
            source=g["source"],
        ),
        machine=Machine(
            type=m["type"],
            vcpus=m["vcpus"],
            memory_bytes=m["memory_gib"] * 2**30,
            gpus=m["gpus"],
            boot_disk_type=m["boot_disk_type"],
            boot_disk_min_gb=m["boot_disk_min_gb"],
            disk_read_bytes_per_s=float(m["disk_read_bytes_per_s"]),
            host_link_bytes_per_s=float(m["host_link_bytes_per_s"]),
            data_read_records_per_s=float(m["data_read_records_per_s"]),
            data_prep_tokens_per_s=float(m["data_prep_tokens_per_s"]),
            hub_download_bytes_per_s=float(m["hub_download_bytes_per_s"]),
            source=m["source"],
        ),
        hours_per_month=float(b["hours_per_month"]),
        nat_cap_vms=b["nat_cap_vms"],
        region=p["region"],
        machine_label=p["machine"],
        price_note=p["note"],
        price_groups=groups,
    )
