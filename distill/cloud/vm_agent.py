"""The teacher VM's startup script, in Python, for "VMs" that are local processes.

:mod:`distill.cloud.startup` is the bash script a real VM runs at boot. This module does the
same steps, in the same order, for the two places where the "VM" is a process on this
machine: the ``local`` backend (``distill-ctl teacher-cloud --backend local``) and the guests
of the Compute stub (``tests/fakes/compute.py``) in tests:

1. read the job file from instance metadata ``distill-job`` (report ``starting``);
2. stage ``distill-inputs`` (``gs://SRC DEST`` per line; a SRC ending in ``/`` is a prefix);
3. run the teacher image's entrypoint, ``distill-ctl teacher --job job.toml`` (report
   ``running``), in the job directory;
4. report ``exit-code`` and ``status`` (``done``, ``preempted`` for exit code 75, ``failed``)
   as guest attributes;
5. delete its own instance through the Compute API with the VM's token (the dead-man switch
   for a controller that died); where the service account may not, just power off.

Metadata comes from ``GCE_METADATA_HOST`` (the stub gives each guest its own server) or, with
``--local DIR``, from ``DIR/metadata.json`` (guest attributes go to
``DIR/guest-attributes.json``). SIGTERM (a preemption's ACPI soft-off reaching the process
group) is left to the teacher, which stops cleanly; this process only waits and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from distill.cloud.preemption import EXIT_PREEMPTED, WATCH_ENV, metadata_get, metadata_host

_sigterm = threading.Event()  # the soft-off reached this "VM"
COMPUTE_ENV = "DISTILL_COMPUTE_ENDPOINT"  # the Compute API's base URL (the stub's in tests)
ENTRYPOINT_ENV = "DISTILL_ENTRYPOINT"  # the container entrypoint to run (default below)


MAX_LOG_LINES = 100_000  # the uploaded log keeps the last lines (the bash script: 16 MiB)
_log: deque[str] = deque(maxlen=MAX_LOG_LINES)  # everything this "VM" printed, for the record


def out(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()
    _log.append(line)


def log(msg: str) -> None:
    out(f"distill-startup: {msg}\n")


class MetadataSource:
    """Instance metadata and guest attributes through the metadata server."""

    watch_preemption = True

    def preempted(self) -> bool:
        try:
            return metadata_get("instance/preempted").strip() == "TRUE"
        except OSError:
            return False

    def attr(self, key: str) -> str | None:
        try:
            return metadata_get(f"instance/attributes/{key}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def identity(self) -> tuple[str, str]:
        return metadata_get("instance/name"), metadata_get("instance/id")

    def report(self, key: str, value: str) -> None:
        url = f"http://{metadata_host()}/computeMetadata/v1/instance/guest-attributes/distill/{key}"
        req = urllib.request.Request(
            url, data=value.encode(), method="PUT", headers={"Metadata-Flavor": "Google"}
        )
        try:
            urllib.request.urlopen(req, timeout=10).close()  # noqa: S310
        except OSError as e:  # best effort, as in the bash script
            log(f"could not report {key}={value}: {e}")

    def power_off(self) -> None:
        """Delete this instance (as the startup script does with curl), else just exit."""
        try:
            name = metadata_get("instance/name")
            zone = metadata_get("instance/zone").rsplit("/", 1)[-1]
            project = metadata_get("project/project-id")
            token = json.loads(metadata_get("instance/service-accounts/default/token"))
        except (OSError, ValueError) as e:
            log(f"cannot read the instance identity ({e}); powering off")
            return
        base = os.environ.get(COMPUTE_ENV, "https://compute.googleapis.com").rstrip("/")
        url = f"{base}/compute/v1/projects/{project}/zones/{zone}/instances/{name}"
        req = urllib.request.Request(
            url,
            method="DELETE",
            headers={"Authorization": f"Bearer {token['access_token']}"},
        )
        try:
            urllib.request.urlopen(req, timeout=30).close()  # noqa: S310
            log(f"deleting instance {name} in {zone}")
        except urllib.error.HTTPError as e:
            log(
                f"cannot delete instance {name} (HTTP {e.code}: the service account lacks "
                "compute.instances.delete on it); powering off instead: `distill-ctl gc` "
                "removes the stopped VM"
            )
        except OSError as e:
            log(f"cannot reach the Compute API to delete {name} ({e}); powering off")


class LocalSource:
    """Metadata from ``DIR/metadata.json``; guest attributes to ``DIR/guest-attributes.json``."""

    watch_preemption = False  # a local "VM" is preempted by SIGTERM only

    def preempted(self) -> bool:
        return False

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self.md: dict[str, str] = json.loads((root / "metadata.json").read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"distill-startup: cannot read {root / 'metadata.json'}: {e}") from e

    def attr(self, key: str) -> str | None:
        return self.md.get(key)

    def identity(self) -> tuple[str, str]:
        info = json.loads((self.root / "vm.json").read_text())
        return info["name"], info["id"]

    def report(self, key: str, value: str) -> None:
        path = self.root / "guest-attributes.json"
        attrs = json.loads(path.read_text()) if path.exists() else {}
        attrs[f"distill/{key}"] = value
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".ga-")
        with os.fdopen(fd, "w") as f:
            json.dump(attrs, f)
        os.replace(tmp, path)

    def power_off(self) -> None:
        log("powering off")


def stage_inputs(text: str, job_dir: Path) -> None:
    """Download each ``SRC DEST`` line (DEST relative to the job directory). A SRC ending in
    ``/`` is a folder; a pinned checkpoint (``hf:ORG/NAME@SHA``, ``gs://...@DIGEST``) is
    staged by :func:`distill.cloud.checkpoint_copy.stage_checkpoint` (a Hub one copied into
    the bucket once for the run)."""
    from distill.checkpoints import is_pinned_ref
    from distill.cloud.checkpoint_copy import stage_checkpoint
    from distill.errors import DistillError
    from distill.store.storage import open_store

    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise SystemExit(f"distill-startup: bad distill-inputs line {line!r}")
        src, dest = parts
        checkpoint = is_pinned_ref(src)
        if (
            dest.startswith("/")
            or ".." in dest.split("/")
            or not (src.startswith("gs://") or checkpoint)
        ):
            raise SystemExit(f"distill-startup: refusing input {src} -> {dest}")
        log(f"staging {src} -> {dest}")
        if checkpoint:
            try:
                stage_checkpoint(src, job_dir / dest, job_dir / "job.toml", log)
            except DistillError as e:
                raise SystemExit(f"distill-startup: {e}") from None
        elif src.endswith("/"):  # a prefix (a model directory)
            store = open_store(src.rstrip("/"))
            store.download_many(store.list(), job_dir / dest)
        else:
            parent, _, base = src.rpartition("/")
            open_store(parent).download(base, job_dir / dest)


def record(source: MetadataSource | LocalSource, status: str, rc: int) -> None:
    """The whole log, then the outcome, as create-only objects under ``distill-status-url``
    (``<instance>-<id>.log`` and ``<instance>-<id>.json``, as the bash script writes them)."""
    from distill.store.storage import open_store

    url = source.attr("distill-status-url")
    if not url:
        return
    try:
        name, vm_id = source.identity()
        store = open_store(url)
        store.put_bytes(f"{name}-{vm_id}.log", "".join(_log).encode())
        body = {
            "instance": name,
            "id": vm_id,
            "status": status,
            "exit_code": rc,
            "log": f"{name}-{vm_id}.log",
        }
        store.put_bytes(f"{name}-{vm_id}.json", json.dumps(body).encode())
    except Exception as e:  # noqa: BLE001 - the guest attributes still say it
        log(f"could not record the status under {url}: {e}")


def run(source: MetadataSource | LocalSource, workdir: Path) -> int:
    source.report("status", "starting")
    job_text = source.attr("distill-job")
    if not job_text:
        log("no distill-job in the instance metadata")
        source.report("exit-code", "64")
        source.report("status", "failed")
        return 64
    job_dir = workdir / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "job.toml").write_text(job_text)
    rc = 1
    try:
        stage_inputs(source.attr("distill-inputs") or "", job_dir)
        entry = shlex.split(os.environ.get(ENTRYPOINT_ENV, "")) or [
            sys.executable,
            "-m",
            "distill.cli",
            "teacher",
        ]
        env = {**os.environ, WATCH_ENV: "1" if source.watch_preemption else "0"}
        source.report("status", "running")
        log(f"running {shlex.join(entry)} --job job.toml")
        child = subprocess.Popen(
            [*entry, "--job", str(job_dir / "job.toml")],
            cwd=job_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert child.stdout is not None
        for line in child.stdout:  # tee: the console, and the log for the status record
            out(line)
        rc = child.wait()
    except SystemExit as e:
        log(str(e.code))
        rc = 64
    except Exception as e:  # noqa: BLE001 - report, whatever it was
        log(f"{type(e).__name__}: {e}")
        rc = 1
    # A preemption may kill the teacher before it handles SIGTERM: what ended it is the
    # preemption (or the soft-off's SIGTERM), not the exit code.
    stopped = rc == EXIT_PREEMPTED or _sigterm.is_set() or source.preempted()
    status = "done" if rc == 0 else "preempted" if stopped else "failed"
    log(f"finished with exit code {rc} ({status})")
    record(source, status, rc)
    source.report("exit-code", str(rc))
    source.report("status", status)  # last: the controller reads it as "recorded"
    source.power_off()
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stage"]:  # the VM's startup script, inside the teacher image
        sp = argparse.ArgumentParser(prog="vm_agent stage", description="stage distill-inputs")
        sp.add_argument("inputs", type=Path, help="the distill-inputs metadata value, as a file")
        sp.add_argument("job_dir", type=Path)
        a = sp.parse_args(argv[1:])
        stage_inputs(a.inputs.read_text(), a.job_dir)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local", type=Path, help="metadata.json here instead of a server")
    ap.add_argument("--workdir", type=Path, help="where the job directory goes")
    args = ap.parse_args(argv)

    # A preemption's SIGTERM reaches the whole process group: the teacher stops cleanly,
    # this process waits for it and reports.
    def on_sigterm(*_: object) -> None:
        _sigterm.set()
        log("SIGTERM: waiting for the teacher to stop")

    signal.signal(signal.SIGTERM, on_sigterm)
    source = LocalSource(args.local) if args.local else MetadataSource()
    if args.workdir or args.local:
        return run(source, args.workdir or args.local)
    workdir = Path(tempfile.mkdtemp(prefix="distill-vm-"))
    try:
        return run(source, workdir)
    finally:  # the staged job (its model among it) is the VM's disk, not ours to keep
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
