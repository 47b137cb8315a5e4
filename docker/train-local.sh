#!/usr/bin/env bash
# `make train-local`: train and evaluate the student, in the student container with the GPU
# where Docker and the NVIDIA container toolkit exist, natively (the project's venv) where not.
#   docker/train-local.sh JOB [VENV_BIN]
# DRY_RUN=1 prints the commands instead of running them; NATIVE=1 forces the native path.
set -euo pipefail

job=${1:?usage: train-local.sh JOB [VENV_BIN]}
bin=${2:-.venv/bin}
image=${STUDENT_IMAGE:-distill-student:local}
cd "$(dirname "$0")/.."

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then echo "+ $*"; else "$@"; fi
}

gpu_docker() {
  [[ ${NATIVE:-0} != 1 ]] || return 1
  command -v docker >/dev/null 2>&1 || return 1
  docker info >/dev/null 2>&1 || return 1
  docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia || \
    command -v nvidia-container-cli >/dev/null 2>&1
}

if gpu_docker; then
  echo "train-local: in the student container ($image) with the GPU"
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    run docker build -f docker/student.Dockerfile -t "$image" .
  fi
  creds=()
  adc=${GOOGLE_APPLICATION_CREDENTIALS:-$HOME/.config/gcloud/application_default_credentials.json}
  if [[ -f $adc ]]; then
    creds=(-v "$adc:/cache/adc.json:ro" -e GOOGLE_APPLICATION_CREDENTIALS=/cache/adc.json)
  fi
  for cmd in train eval; do
    run docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD:/work" -w /work \
      "${creds[@]}" -e STORAGE_EMULATOR_HOST -e GOOGLE_CLOUD_PROJECT \
      "$image" "$cmd" --job "$job"
  done
else
  echo "train-local: natively ($bin/distill-ctl; no Docker with an NVIDIA runtime here)"
  run "$bin/distill-ctl" train --job "$job"
  run "$bin/distill-ctl" eval --job "$job"
fi
