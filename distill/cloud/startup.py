"""The teacher VM's startup script (instance metadata ``startup-script``, run as root at boot).

It is static: everything job-specific comes from other metadata keys, so one reviewed script
serves every job. It reads the job file (``distill-job``), stages inputs (``distill-inputs``:
one ``gs://SRC DEST`` per line, DEST relative to the job directory; a SRC ending in ``/`` is
copied recursively), waits for the GPU (the Deep Learning VM image brings the NVIDIA driver,
Docker and the NVIDIA container toolkit), and runs the teacher image (``distill-image``) once
with the job file mounted read-only (``job.output`` must be a ``gs://`` URL) and
``DISTILL_WATCH_PREEMPTION=1``, so the teacher stops cleanly on a preemption notice.

When the teacher ends it records the outcome: guest attributes ``distill/status`` (``done``,
``preempted`` for exit code 75, ``failed``) and ``distill/exit-code`` (readable through the
Compute API without any role on the VM), and, durable after the VM is gone, one create-only
object ``<distill-status-url>/<instance>-<id>.json`` with the status, exit code and the log's
tail. Then the VM **deletes itself** through the Compute API with its own token (the service
account holds ``compute.instances.delete`` on ``distill-teacher-*`` instances only, see
``infra/terraform/base``), so it never outlives the job even if the controller died; if that is
refused it powers off (TERMINATED: only the boot disk is billed, ``distill-ctl gc`` removes
it). A reboot reruns the script safely: the teacher resumes from the shards in the bucket.

``SHUTDOWN_SCRIPT`` (metadata ``shutdown-script``) runs on the ACPI soft-off of a preemption
(about 30 s before the VM is gone) and stops the container with SIGTERM and a 25 s grace.
:mod:`distill.cloud.vm_agent` is this script's Python twin for local "VMs".
"""

from __future__ import annotations

JOB_DIR = "/var/lib/distill/job"

STARTUP_SCRIPT = r"""#!/bin/bash
# distill teacher VM (rendered by distill/cloud/spec.py; see distill/cloud/startup.py).
set -euo pipefail

readonly MD=http://metadata.google.internal/computeMetadata/v1
readonly JOB_DIR=__JOB_DIR__
readonly LOG=/var/log/distill-teacher.log

log() { echo "distill-startup: $*"; }
md() { curl -fsS --retry 5 -H "Metadata-Flavor: Google" "$MD/$1"; }
attr() { md "instance/attributes/$1"; }
report() {  # guest attribute distill/$1 = $2, for the watcher (best effort)
  curl -fsS -X PUT --data "$2" -H "Metadata-Flavor: Google" \
    "$MD/instance/guest-attributes/distill/$1" >/dev/null || true
}
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'; }
record() {  # the outcome as one create-only object next to the shards (best effort)
  local url name id
  url=$(attr distill-status-url 2>/dev/null) || return 0
  name=$(md instance/name) && id=$(md instance/id) || return 0
  {
    printf '{"instance": "%s", "id": "%s", "status": "%s", "exit_code": %s, "log_tail": ' \
      "$name" "$id" "$1" "$2"
    tail -n 100 "$LOG" 2>/dev/null | json_str
    printf '}\n'
  } | gcloud storage cp --if-generation-match=0 - "$url/$name-$id.json" || true
}
self_delete() {  # the VM never outlives its job; power off where the API refuses
  local token project zone name
  token=$(md instance/service-accounts/default/token | python3 -c \
    'import json,sys; print(json.load(sys.stdin)["access_token"])') || return 1
  project=$(md project/project-id) && zone=$(md instance/zone) && name=$(md instance/name) \
    || return 1
  local api=https://compute.googleapis.com/compute/v1
  curl -fsS -X DELETE -H "Authorization: Bearer $token" \
    "$api/projects/$project/zones/${zone##*/}/instances/$name" >/dev/null
}
finish() {
  local rc=$? status=failed
  [[ $rc -eq 0 ]] && status="done"
  # a preemption may kill the teacher before it handles SIGTERM: the notice decides
  if [[ $rc -eq 75 || $(md instance/preempted 2>/dev/null) == TRUE ]]; then
    status=preempted
  fi
  report exit-code "$rc"
  report status "$status"
  record "$status" "$rc"
  log "finished with exit code $rc ($status)"
  sync
  if self_delete; then
    log "deleting this instance"
    sleep 120  # the deletion stops the VM
  fi
  log "cannot delete this instance (compute.instances.delete refused); powering off"
  shutdown -h now
}
trap finish EXIT

report status starting
image=$(attr distill-image)
mkdir -p "$JOB_DIR"
attr distill-job >"$JOB_DIR/job.toml"

if inputs=$(attr distill-inputs 2>/dev/null); then
  while read -r src dest; do
    [[ -z $src ]] && continue
    case $dest in
      "" | /* | *..*) log "refusing input destination '$dest' for $src"; exit 64 ;;
    esac
    mkdir -p "$(dirname "$JOB_DIR/$dest")"
    log "staging $src -> $dest"
    if [[ $src == */ ]]; then
      mkdir -p "$JOB_DIR/$dest"
      gcloud storage cp --recursive "${src}*" "$JOB_DIR/$dest/"
    else
      gcloud storage cp "$src" "$JOB_DIR/$dest"
    fi
  done <<<"$inputs"
fi
chmod -R a+rX "$JOB_DIR"

report status waiting-for-gpu
for _ in $(seq 60); do
  nvidia-smi >/dev/null 2>&1 && break
  sleep 10
done
nvidia-smi
command -v docker >/dev/null || { log "docker is missing from the boot image"; exit 69; }

registry=${image%%/*}
if [[ $registry == *-docker.pkg.dev ]]; then
  gcloud auth configure-docker "$registry" --quiet
fi
report status pulling
docker pull "$image"
report status running
docker run --rm --gpus all --network host --name distill-teacher --stop-timeout 25 \
  -e DISTILL_WATCH_PREEMPTION=1 \
  --mount "type=bind,src=$JOB_DIR,dst=/job,readonly" --workdir /job \
  "$image" --job /job/job.toml 2>&1 | tee "$LOG"
""".replace("__JOB_DIR__", JOB_DIR)

SHUTDOWN_SCRIPT = r"""#!/bin/bash
# distill teacher VM: on ACPI soft-off (a Spot preemption leaves ~30 s), stop the teacher with
# SIGTERM and 25 s of grace; it abandons the shard in flight and exits 75 (see startup.py).
docker stop --time 25 distill-teacher >/dev/null 2>&1 || true
"""
