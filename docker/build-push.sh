#!/usr/bin/env bash
# Build an image from a Dockerfile of this repository and push it, unless the registry
# already has that tag (Artifact Registry tags are immutable: a tag is one build).
#   docker/build-push.sh docker/teacher.Dockerfile REGION-docker.pkg.dev/PROJECT/distill/teacher:TAG
# Uses docker, else podman. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

dockerfile=${1:?usage: build-push.sh DOCKERFILE IMAGE}
image=${2:?usage: build-push.sh DOCKERFILE IMAGE}
cd "$(dirname "$0")/.."

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then echo "+ $*"; else "$@"; fi
}

engine=${CONTAINER_ENGINE:-}
if [[ -z $engine ]]; then
  if command -v docker >/dev/null 2>&1; then
    engine=docker
  elif command -v podman >/dev/null 2>&1; then
    engine=podman
  else
    echo "build-push: neither docker nor podman is installed: install Docker to build" \
      "$dockerfile, or pass IMAGE=... of an image already pushed with SKIP_BUILD=1" >&2
    exit 2
  fi
fi

if [[ ${image##*/} != *:* && $image != *@sha256:* ]]; then
  echo "build-push: image '$image' has no tag" >&2
  exit 2
fi
case $image in
  */*) ;;
  *) echo "build-push: image '$image' names no registry (REGION-docker.pkg.dev/PROJECT/...)" >&2
     exit 2 ;;
esac

# Registry auth first: without it `manifest inspect` fails as "not found" and every run rebuilds.
registry=${image%%/*}
if [[ $registry == *-docker.pkg.dev ]] && command -v gcloud >/dev/null 2>&1; then
  run gcloud auth configure-docker "$registry" --quiet
fi

if [[ ${DRY_RUN:-0} != 1 ]] && "$engine" manifest inspect "$image" >/dev/null 2>&1; then
  echo "build-push: $image is already in the registry; not rebuilding"
  exit 0
fi

# The L4 VMs are x86-64: an Apple-silicon laptop would otherwise build (and push) arm64.
run "$engine" build --platform linux/amd64 -f "$dockerfile" -t "$image" .
run "$engine" push "$image"
