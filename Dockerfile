# syntax=docker/dockerfile:1
# Inflow images. One wheel, two installs:
#
#   serving (default, last stage): `pip install inflow` with no extras: the worker and the operator
#       CLI on ONNX Runtime. No torch, transformers or scikit-learn. It never builds an engine: it
#       loads the active version from the registry (a shared volume) and waits, not ready, until
#       one exists.
#         docker build -t inflow:0.1.0 .
#         docker build -t inflow-gpu:0.1.0 --build-arg INFLOW_EXTRAS=gpu .    # TensorRT worker
#
#   build: `pip install inflow[build]` for the one-shot engine job (train the head, export to
#       ONNX, quantize, gate against torch fp32, register, activate). Its default command runs
#       `inflow engine ensure` once and writes the registry to INFLOW_ENGINE_DIR (mount the
#       shared volume there).
#         docker build --target build -t inflow-build:0.1.0 .
#         docker build --target build -t inflow-build-gpu:0.1.0 --build-arg INFLOW_EXTRAS=gpu .
#
# torch from the default index is the CUDA build (several GB). Where the PyTorch CPU wheel index
# is reachable, a CPU-only build image is much smaller:
#         docker build --target build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# (an extra index: pip takes torch's "+cpu" wheel from it and everything else as usual). Empty
# (the default) adds no index.
#
# Both runtime stages run as uid/gid 1000 and keep their state in /var/lib/inflow; the serving
# stage also works with a read-only root filesystem (Kubernetes mounts an emptyDir there).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- the wheel: built once from the four packages, installed by both runtime stages -------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY engines ./engines
COPY indexer ./indexer
COPY schemas ./schemas
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- what both runtime images share: user, state folders, environment ----------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    INFLOW_STATE_DIR=/var/lib/inflow \
    INFLOW_ENGINE_DIR=/var/lib/inflow/engines \
    INFLOW_MODEL_DIR=/var/lib/inflow/models
# curl: the health checks. The engines folder is created here, owned by the inflow user, so that a
# fresh named volume mounted on it starts out writable for the (non-root) build job.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 inflow \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin inflow \
    && mkdir -p /var/lib/inflow/engines /var/lib/inflow/models \
    && chown -R 1000:1000 /var/lib/inflow
WORKDIR /var/lib/inflow

# --- build: the one-shot engine job --------------------------------------------------------------
FROM runtime AS build
ARG INFLOW_EXTRAS=""
ARG TORCH_INDEX_URL=""
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    set -eu; \
    wheel="$(ls /dist/inflow-*.whl)"; \
    pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url $TORCH_INDEX_URL} \
        "${wheel}[build${INFLOW_EXTRAS:+,$INFLOW_EXTRAS}]"
USER 1000:1000
CMD ["inflow", "engine", "ensure", "--quiet"]

# --- serving: the worker (default target, so it is the last stage) --------------------------------
FROM runtime AS serving
ARG INFLOW_EXTRAS=""
ARG TORCH_INDEX_URL=""
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    set -eu; \
    wheel="$(ls /dist/inflow-*.whl)"; \
    pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url $TORCH_INDEX_URL} \
        "${wheel}${INFLOW_EXTRAS:+[$INFLOW_EXTRAS]}"
# Inside a container the web server (health, metrics) must listen beyond loopback; compose
# publishes it on 127.0.0.1 only, Kubernetes behind a ClusterIP Service.
ENV INFLOW_WEB_HOST=0.0.0.0 \
    INFLOW_WEB_PORT=6066
USER 1000:1000
EXPOSE 6066
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fs "http://127.0.0.1:${INFLOW_WEB_PORT}/health/live" > /dev/null || exit 1
CMD ["inflow", "worker"]
