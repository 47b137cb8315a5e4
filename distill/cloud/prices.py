"""The price table (USD): distill/hardware/l4.toml's dated groups, ``--prices FILE`` overrides.

The defaults are the data file's (each group, e.g. ``vm`` or ``nat``, with its ``as_of`` date
and source); a TOML or JSON file replaces any subset of the fields of :class:`Prices` (flat, or
under a ``[prices]`` table), and unknown keys are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.hardware import DATA_PATH, l4

HOURS_PER_MONTH = l4().hours_per_month  # Google's billing month
NAT_CAP_VMS = l4().nat_cap_vms  # above this many VMs, Cloud NAT charges the flat hourly rate


@dataclass(frozen=True)
class Prices:
    """A dated price table (USD): :func:`default_prices`, or :func:`load_prices`'s overrides."""

    as_of: str  # the table's date (the defaults: their oldest group's)
    source: str
    region: str
    machine: str
    vm_on_demand_per_hour: float
    vm_spot_per_hour: float
    boot_disk_per_gb_month: float  # pd-balanced
    storage_per_gb_month: float  # Cloud Storage Standard, regional
    egress_per_gb: float  # internet egress (premium tier, first TB), no free tier counted
    nat_per_vm_hour: float  # Cloud NAT, per VM using the gateway, up to NAT_CAP_VMS VMs
    nat_max_per_hour: float  # the gateway's hourly charge above NAT_CAP_VMS VMs
    nat_per_gb: float  # data processed, in or out
    basis: dict[str, str] = field(default_factory=dict)  # price group -> its date and source


PRICE_NUMBERS = tuple(f.name for f in dataclasses.fields(Prices) if f.type in ("float", float))
# what --prices may set: every field but the per-group basis
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(Prices) if f.name != "basis")


def price_groups() -> dict[str, tuple[str, ...]]:
    """Group name -> the price fields it dates (the data file's ``[prices.*]`` tables)."""
    return {name: tuple(g.prices) for name, g in l4().price_groups.items()}


def default_prices() -> Prices:
    """The data file's prices (:data:`distill.hardware.DATA_PATH`)."""
    facts = l4()
    numbers = {k: v for g in facts.price_groups.values() for k, v in g.prices.items()}
    if sorted(numbers) != sorted(PRICE_NUMBERS):
        raise RuntimeError(f"{DATA_PATH}: prices {sorted(numbers)}, expected {PRICE_NUMBERS}")
    return Prices(
        as_of=facts.prices_as_of,
        source=f"{DATA_PATH} (version {facts.version}): {facts.price_note}",
        region=facts.region,
        machine=facts.machine_label,
        basis={name: f"as of {g.as_of}, {g.source}" for name, g in facts.price_groups.items()},
        **numbers,
    )


def load_prices(path: Path | None) -> Prices:
    """The defaults, with the fields a TOML/JSON file names replaced (unknown keys refused);
    a group with a replaced price is dated and sourced by the file."""
    defaults = default_prices()
    if path is None:
        return defaults
    raw = read_table(path, "price file")
    if isinstance(raw.get("prices"), dict):  # allow a [prices] table
        raw = raw["prices"]
    unknown = sorted(set(raw) - set(OVERRIDABLE))
    if unknown:
        raise DistillError(
            f"{path}: unknown price {unknown[0]!r} (known: {', '.join(sorted(OVERRIDABLE))})"
        )
    values: dict[str, Any] = {}
    for key, v in raw.items():
        if key in PRICE_NUMBERS:
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or v < 0
                or not math.isfinite(v)
            ):
                raise DistillError(f"{path}: {key} must be a number >= 0, got {v!r}")
            values[key] = float(v)
        elif not isinstance(v, str):
            raise DistillError(f"{path}: {key} must be a string, got {v!r}")
        else:
            values[key] = v
    values.setdefault("source", f"{path} (defaults for the fields it does not set)")
    values.setdefault("as_of", "unknown (set as_of in the price file)")
    basis = dict(defaults.basis)
    for name, keys in price_groups().items():
        if any(k in raw for k in keys):
            basis[name] = f"as of {values['as_of']}, {path}"
    return dataclasses.replace(defaults, basis=basis, **values)


def read_table(path: Path, what: str) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON file's top-level table; :class:`DistillError` naming ``what``
    and the path when it is missing, malformed or not a table."""
    if not path.is_file():
        raise DistillError(f"{what} {path} not found")
    text = path.read_text()
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise DistillError(f"{path}: not valid {kind}: {e}") from None
    if not isinstance(raw, dict):
        raise DistillError(f"{path}: expected a table/object, got {type(raw).__name__}")
    return raw
