"""A teacher checkpoint onto a VM: from its bucket, or from the Hub copied into the bucket once.

The VM's inputs (``distill-inputs``, or a Batch task's ``DISTILL_INPUTS_B64``) name a pinned
source (:mod:`distill.checkpoints`) as the source of ``model``:

- ``gs://BUCKET/PATH@DIGEST model``: the folder's checkpoint files, :data:`COPY_STREAMS` at
  once, after checking the listing against the pin (a folder rewritten since planning is
  refused, not half-mixed);
- ``hf:ORG/NAME@SHA model``: copied into ``<output>/inputs/<slug>/`` **once for the whole run**
  and read from there. The first VM to create the claim object ``.claim-0`` (create-only)
  downloads the commit from the Hub (a gated model's token from Secret Manager,
  :func:`read_secret`) and uploads it; ``distill-source.json``, written last, marks the copy
  complete. Every other VM, and every relaunch, waits for that marker and reads the bucket
  (Private Google Access: no Cloud NAT bytes). A copier that went away (preempted) leaves its
  claim stale: nothing new appears under the folder (the copier adds a heartbeat object every
  :data:`BEAT_S` while it downloads) for :data:`STALE_S`, and the next waiter creates
  ``.claim-1`` and copies, keeping every complete object already there. A copy that fails
  for good (no access to a gated model, a missing file) writes ``.claim-N.failed``: the VMs
  waiting for it fail with its message; a later run claims again.

The token is passed to huggingface_hub as an argument: never an environment variable, a file,
a log line or the job file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

from distill.checkpoints import (
    COPY_STREAMS,
    SOURCE_FILE,
    Pinned,
    check_sizes,
    download,
    parse_source,
    pin,
)
from distill.errors import DistillError
from distill.store.storage import ObjectExists, Store, open_store
from distill.teacher.stop import metadata_get

SECRETS_ENV = "DISTILL_SECRETMANAGER_ENDPOINT"  # Secret Manager's base URL (a fake in tests)
SECRETS_URL = "https://secretmanager.googleapis.com"
BEAT_S = float(os.environ.get("DISTILL_COPY_BEAT_S", 60))
STALE_S = float(os.environ.get("DISTILL_COPY_STALE_S", 900))
POLL_S = float(os.environ.get("DISTILL_COPY_POLL_S", 10))


def copy_folder(output: str, ref: str) -> str:
    """Where a Hub checkpoint is copied in the run's bucket: ``<output>/inputs/model-<ref>``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", ref.removeprefix("hf:"))
    return f"{output.rstrip('/')}/inputs/model-hf-{slug}"


def stage_checkpoint(src: str, dest: Path, job_toml: Path, log=print) -> None:
    """Put the checkpoint ``src`` (pinned) in ``dest``, with its ``distill-source.json``."""
    source = parse_source(src)
    if source is None or not source.pinned:
        raise DistillError(f"{src!r} is not a pinned hf: or gs:// checkpoint")
    if source.kind == "gs":
        pinned = pin(source)  # refuses a folder whose listing is not the pinned one
        log(f"staging {pinned.ref}: {len(pinned.files)} files, {_gb(pinned.weights_bytes)}")
        download(pinned, pinned.files, dest)
    else:
        job = tomllib.loads(job_toml.read_text())
        output = str(job.get("job", {}).get("output", ""))
        if not output.startswith("gs://"):
            raise DistillError(f"{job_toml}: job.output {output!r} is not a gs:// URL")
        secret = str(job.get("cloud", {}).get("hf_token_secret", ""))
        pinned = copy_once(
            source.ref, open_store(copy_folder(output, source.ref)), dest, secret, log
        )
    (dest / SOURCE_FILE).write_text(json.dumps(pinned.record(), indent=1) + "\n")


def copy_once(ref: str, store: Store, dest: Path, secret: str, log=print) -> Pinned:
    """The Hub commit ``ref`` in ``dest``, through ``store``: copied there by whichever VM
    claims it first, read from there by the others (see the module docstring)."""
    seen, since = -1, time.monotonic()
    failed_before: set[str] | None = None  # copies that failed before this VM looked
    while True:
        names = store.list()
        if failed_before is None:
            failed_before = {n for n in names if n.endswith(".failed")}
        if SOURCE_FILE in names:
            pinned = Pinned.from_record(json.loads(store.read_bytes(SOURCE_FILE)))
            if pinned.ref != ref:
                raise DistillError(f"{store.join(SOURCE_FILE)} is {pinned.ref}, not {ref}")
            log(f"reading {ref} from {store.url} ({_gb(pinned.weights_bytes)})")
            store.download_many(sorted(pinned.files), dest, COPY_STREAMS)
            check_sizes(dest, pinned.files, store.url)
            return pinned
        claims = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"\.claim-(\d+)", n)))
        failed = f".claim-{claims[-1]}.failed" if claims else ""
        if failed in names and failed not in failed_before:  # while this VM waited for it
            why = store.read_bytes(failed).decode(errors="replace")
            raise DistillError(f"another VM's copy of {ref} failed: {why}")
        stale = len(names) == seen and time.monotonic() - since > STALE_S
        if not claims or failed in names or stale:  # (an earlier run's failure: try again)
            n = claims[-1] + 1 if claims else 0
            if stale:
                log(f"the copy of {ref} into {store.url} made no progress for {STALE_S:.0f} s")
            try:
                store.put_bytes(f".claim-{n}", json.dumps({"at": time.time()}).encode())
            except ObjectExists:  # another VM claimed it first: wait for that one
                seen, since = -1, time.monotonic()
                continue
            try:
                return _copy(ref, store, dest, secret, f".claim-{n}", log)
            except DistillError as e:  # the others would fail the same way: say it once
                with contextlib.suppress(DistillError):
                    store.put_bytes(f".claim-{n}.failed", str(e).encode())
                raise
        if len(names) != seen:
            seen, since = len(names), time.monotonic()
            log(f"waiting for another VM's copy of {ref} into {store.url}")
        time.sleep(POLL_S)


def _copy(ref: str, store: Store, dest: Path, secret: str, claim: str, log) -> Pinned:
    """Hub -> this VM's disk -> the bucket; the marker last."""
    token = read_secret(secret) if secret else None
    source = parse_source(ref)
    assert source is not None
    pinned = pin(source, token)
    stop = threading.Event()

    def beat() -> None:  # the waiters' sign that this copy is alive
        k = 0
        while not stop.wait(BEAT_S):
            k += 1
            try:
                store.put_bytes(f"{claim}.beat-{k}", b"")
            except DistillError as e:  # best effort
                log(f"heartbeat: {e}")

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        log(
            f"copying {ref} from the Hub into {store.url} (once for this run): "
            f"{len(pinned.files)} files, {_gb(pinned.weights_bytes)}"
        )
        t0 = time.monotonic()
        download(pinned, pinned.files, dest, token)
        log(f"downloaded in {time.monotonic() - t0:,.0f} s; uploading")
        there = store.put_files([(n, dest / n) for n in sorted(pinned.files)], COPY_STREAMS)
        if there:  # an earlier copier's objects: complete (GCS objects are), the right size?
            sizes = {i.name: i.size for i in store.list_info()}
            bad = [n for n in there if sizes.get(n) != pinned.files[n]]
            if bad:
                raise DistillError(
                    f"{store.url}: {', '.join(bad)} already there at another size than {ref}'s "
                    "(written by something else): remove that folder and rerun"
                )
        with contextlib.suppress(ObjectExists):
            store.put_bytes(SOURCE_FILE, json.dumps(pinned.record(), indent=1).encode())
        log(f"copied {ref} into {store.url} in {time.monotonic() - t0:,.0f} s")
    finally:
        stop.set()
    return pinned


def read_secret(name: str) -> str:
    """A Secret Manager secret's payload (``projects/P/secrets/S[/versions/V]``; latest by
    default), read with the VM's service account (its metadata-server token)."""
    version = name if "/versions/" in name else f"{name}/versions/latest"
    base = os.environ.get(SECRETS_ENV, SECRETS_URL).rstrip("/")
    headers = {}
    token = _vm_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif SECRETS_ENV not in os.environ:
        raise DistillError(
            f"cannot read {name}: no access token from the metadata server (not on a Google "
            "Cloud VM?)"
        )
    req = urllib.request.Request(f"{base}/v1/{version}:access", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 (https or a test URL)
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        why = {
            401: "the request had no valid credentials",
            403: "the VM's service account lacks roles/secretmanager.secretAccessor on it "
            "(infra/terraform/base grants it for var.hf_token_secret)",
            404: "no such secret or version (create it: `gcloud secrets create NAME "
            "--data-file=-`, then paste the Hub token)",
        }.get(e.code, f"HTTP {e.code}")
        raise DistillError(f"cannot read the Hub token from {name}: {why}") from None
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot read the Hub token from {name}: {e}") from None
    try:
        return base64.b64decode(body["payload"]["data"]).decode().strip()
    except (KeyError, ValueError, TypeError) as e:
        raise DistillError(f"{name}: Secret Manager's answer has no payload ({e})") from None


def _vm_token() -> str | None:
    try:
        return json.loads(metadata_get("instance/service-accounts/default/token", timeout=3))[
            "access_token"
        ]
    except (OSError, ValueError, KeyError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"
