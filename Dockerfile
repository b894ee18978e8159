# GPU image for the API and the workers (same image, different command).
#   docker build -t grounded-sam-backend .
#   docker run --gpus all -p 9090:9090 -v models:/models grounded-sam-backend serve
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# The torch/torchvision pair the project is tested with (README "Set up", .ci/run), from PyTorch's CUDA 13.0
# index. Another CUDA: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 (and a matching FROM).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/huggingface \
    PORT=9090 \
    WORKER_HEARTBEAT_FILE=/tmp/grounded-sam-worker.alive

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV

# torch and torchvision first, as one pair from the same index: the project's requirements are only lower bounds,
# so `pip install .` keeps them. torchvision: SAM 2 / 3, EdgeTAM and segment-anything (SAM_CHECKPOINT) need it.
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY label_config ./label_config
RUN pip install .

RUN useradd --create-home --uid 10001 app && mkdir -p /models && chown app:app /models
USER app

# Model weights (Hugging Face cache and .pth checkpoints) live here so they survive restarts.
VOLUME ["/models"]
EXPOSE 9090

# `grounded-sam health` reads the same settings as the server (PORT, BASIC_AUTH_USER/PASS): UP → exit 0.
# Only the API answers /health: a `worker` container checks its heartbeat file instead, with
# `grounded-sam health --worker` (docker-compose.yml; `docker run --health-cmd "grounded-sam health --worker"`).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["grounded-sam", "health"]

ENTRYPOINT ["grounded-sam"]
CMD ["serve"]
