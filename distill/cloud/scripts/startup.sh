#!/bin/bash
# distill teacher VM on Container-Optimized OS (rendered by distill/cloud/spec.py; see
# distill/cloud/startup.py).
set -uo pipefail

readonly MD=http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1
readonly GCS=${STORAGE_EMULATOR_HOST:-https://storage.googleapis.com}
readonly COMPUTE=${DISTILL_COMPUTE_ENDPOINT:-https://compute.googleapis.com}
readonly STATE=${DISTILL_STATE_DIR:-/var/lib/distill}  # COS: /var is writable, / is not
readonly NVIDIA=${DISTILL_NVIDIA_DIR:-/var/lib/nvidia}  # where cos-extensions puts the driver
readonly DEV=${DISTILL_DEV_DIR:-/dev}
readonly JOB_DIR=$STATE/job
readonly LOG=$STATE/startup.log
readonly MAX_LOG_BYTES=$((16 * 1024 * 1024))  # the uploaded log keeps its last 16 MiB

log() { echo "distill-startup: $*"; }
md() { curl -fsS --retry 5 -H "Metadata-Flavor: Google" "$MD/$1"; }
attr() { md "instance/attributes/$1"; }
report() {  # guest attribute distill/$1 = $2, for the watcher (best effort)
  curl -fsS -X PUT --data "$2" -H "Metadata-Flavor: Google" \
    "$MD/instance/guest-attributes/distill/$1" >/dev/null 2>&1 || true
}
token() {
  md instance/service-accounts/default/token |
    sed -nE 's/.*"access_token" *: *"([^"]+)".*/\1/p'
}
urlencode() {
  local s=$1 out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in
      [a-zA-Z0-9.~_-]) out+=$c ;;
      *) printf -v c '%%%02X' "'$c"; out+=$c ;;
    esac
  done
  printf '%s' "$out"
}
gcs_put() {  # gcs_put gs://BUCKET/OBJECT FILE TYPE: a create-only upload (ifGenerationMatch=0)
  local path=${1#gs://} tok query
  tok=$(token) && [[ -n $tok ]] || return 1
  query="uploadType=media&ifGenerationMatch=0&name=$(urlencode "${path#*/}")"
  curl -fsS -X POST --data-binary "@$2" -H "Authorization: Bearer $tok" -H "Content-Type: $3" \
    "$GCS/upload/storage/v1/b/${path%%/*}/o?$query" >/dev/null
}

main() {  # every step that can fail; its output is the log
  set -euo pipefail
  trap 'log "SIGTERM: waiting for the teacher to stop"' TERM
  report status starting
  local image registry driver need version major
  image=$(attr distill-image)
  attr distill-job >"$JOB_DIR/job.toml"

  report status installing-gpu-driver
  driver=$(attr distill-gpu-driver 2>/dev/null || echo latest)
  log "installing the NVIDIA driver (cos-extensions install gpu -- -version=$driver)"
  cos-extensions install gpu -- -version="$driver"
  mount --bind "$NVIDIA" "$NVIDIA"
  mount -o remount,exec "$NVIDIA"
  "$NVIDIA/bin/nvidia-smi"
  version=$("$NVIDIA/bin/nvidia-smi" --query-gpu=driver_version --format=csv,noheader | head -n1)
  need=$(attr distill-min-driver 2>/dev/null || echo 0)
  major=${version%%.*}
  if ! [[ $major =~ ^[0-9]+$ ]] || ((major < need)); then
    log "NVIDIA driver '$version' is older than $need, which the teacher image's CUDA needs:" \
      "set metadata distill-gpu-driver to a newer version (cos-extensions list) or use an" \
      "image family whose drivers are newer"
    return 69
  fi

  registry=${image%%/*}
  if [[ $registry == *-docker.pkg.dev || $registry == *gcr.io ]]; then
    docker-credential-gcr configure-docker --registries="$registry"
  fi
  report status pulling
  docker pull "$image"

  local gpu=(--volume "$NVIDIA/lib64:/usr/local/nvidia/lib64"
    --volume "$NVIDIA/bin:/usr/local/nvidia/bin")
  local d
  for d in "$DEV"/nvidia[0-9]* "$DEV/nvidia-uvm" "$DEV/nvidiactl"; do
    [[ -e $d ]] && gpu+=(--device "$d:/dev/${d##*/}")
  done

  if attr distill-inputs >"$STATE/inputs" 2>/dev/null && [[ -s $STATE/inputs ]]; then
    report status staging
    # The job directory is root's (this script's); the image runs as its own USER (10001),
    # which may not write here: staging runs as root, the teacher then reads (a+rX, below).
    docker run --rm --network host --user 0:0 --entrypoint python3 \
      --mount "type=bind,src=$STATE,dst=/state" "$image" \
      -m distill.cloud.vm_agent stage /state/inputs /state/job
  fi
  chmod -R a+rX "$JOB_DIR"

  report status running
  docker run --rm --network host --name distill-teacher --stop-timeout 25 "${gpu[@]}" \
    -e DISTILL_WATCH_PREEMPTION=1 \
    --mount "type=bind,src=$JOB_DIR,dst=/job,readonly" --workdir /job \
    "$image" --job /job/job.toml
}

record() {  # the whole log, then the outcome, as create-only objects (best effort)
  local url name id
  url=$(attr distill-status-url 2>/dev/null) || return 0
  name=$(md instance/name) && id=$(md instance/id) || return 0
  tail -c "$MAX_LOG_BYTES" "$LOG" >"$STATE/upload.log"
  gcs_put "$url/$name-$id.log" "$STATE/upload.log" "text/plain; charset=utf-8" ||
    log "could not upload the log to $url/$name-$id.log"
  printf '{"instance": "%s", "id": "%s", "status": "%s", "exit_code": %s, "log": "%s"}\n' \
    "$name" "$id" "$1" "$2" "$name-$id.log" >"$STATE/status.json"
  gcs_put "$url/$name-$id.json" "$STATE/status.json" "application/json" ||
    log "could not upload the status to $url/$name-$id.json"
}
self_delete() {  # the VM never outlives its job
  local tok project zone name
  tok=$(token) && [[ -n $tok ]] || return 1
  project=$(md project/project-id) && zone=$(md instance/zone) && name=$(md instance/name) ||
    return 1
  curl -fsS -X DELETE -H "Authorization: Bearer $tok" \
    "$COMPUTE/compute/v1/projects/$project/zones/${zone##*/}/instances/$name" >/dev/null
}

trap 'log "SIGTERM: waiting for the teacher to stop"' TERM
mkdir -p "$JOB_DIR" "$STATE/home"
export HOME=$STATE/home  # docker-credential-gcr writes $HOME/.docker/config.json
( main ) 2>&1 | (trap '' TERM; exec tee -a "$LOG")  # tee outlives a SIGTERM to the group
rc=${PIPESTATUS[0]}
status=failed
[[ $rc -eq 0 ]] && status="done"
# a preemption may kill the teacher before it handles SIGTERM: the notice decides
if [[ $rc -eq 75 || $(md instance/preempted 2>/dev/null) == TRUE ]]; then
  status=preempted
fi
{
  log "finished with exit code $rc ($status)"
  record "$status" "$rc"
  report exit-code "$rc"
  report status "$status"  # last: the controller reads it as "recorded"
} 2>&1 | tee -a "$LOG"
sync
if self_delete; then
  log "deleting this instance"
  sleep 120  # the deletion stops the VM
fi
log "cannot delete this instance (compute.instances.delete refused); powering off"
shutdown -h now
