"""The teacher VM's startup script (instance metadata ``startup-script``, run as root at boot).

It is static: everything job-specific comes from other metadata keys, so one reviewed script
serves every job. It reads the job file (``distill-job``), stages inputs (``distill-inputs``:
one ``gs://SRC DEST`` per line, DEST relative to the job directory), waits for the GPU (the
Deep Learning VM image brings the NVIDIA driver, Docker and the NVIDIA container toolkit),
runs the teacher image (``distill-image``) once with the job file (mounted read-only;
``job.output`` must be a ``gs://`` URL), records the outcome as
guest attributes ``distill/status`` and ``distill/exit-code`` (readable through the Compute
API without any role on the VM), and powers the VM off whatever happened. A rerun (a reboot)
is safe: the teacher resumes from the shards already in the bucket.
"""

from __future__ import annotations

JOB_DIR = "/var/lib/distill/job"

STARTUP_SCRIPT = r"""#!/bin/bash
# distill teacher VM (rendered by distill/cloud/spec.py; see distill/cloud/startup.py).
set -euo pipefail

readonly MD=http://metadata.google.internal/computeMetadata/v1/instance
readonly JOB_DIR=__JOB_DIR__

log() { echo "distill-startup: $*"; }
attr() { curl -fsS --retry 5 -H "Metadata-Flavor: Google" "$MD/attributes/$1"; }
report() {  # guest attribute distill/$1 = $2, for the watcher (best effort)
  curl -fsS -X PUT --data "$2" -H "Metadata-Flavor: Google" \
    "$MD/guest-attributes/distill/$1" >/dev/null || true
}
finish() {
  local rc=$?
  report exit-code "$rc"
  if [[ $rc -eq 0 ]]; then report status "done"; else report status failed; fi
  log "finished with exit code $rc; powering off"
  sync
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
    gcloud storage cp --recursive "$src" "$JOB_DIR/$dest"
  done <<<"$inputs"
fi

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
docker run --rm --gpus all --network host --name distill-teacher \
  --mount "type=bind,src=$JOB_DIR,dst=/job,readonly" --workdir /job \
  "$image" --job /job/job.toml
""".replace("__JOB_DIR__", JOB_DIR)
