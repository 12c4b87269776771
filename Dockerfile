# syntax=docker/dockerfile:1.7
#
# alignd: one image for both tiers.
#   docker run IMAGE                                   -> API   (alignd-server serve --host 0.0.0.0 --port 8000)
#   docker run IMAGE worker                            -> arq worker (spawns `python -m workers.training` children)
#   docker run IMAGE migrate                           -> Alembic migrations (the Helm pre-install/upgrade hook)
#
# Build arguments:
#   VARIANT=cpu   (default) python:3.11-slim base; with WITH_TRAIN=true, torch comes from the PyTorch CPU index.
#   VARIANT=cuda  nvidia/cuda runtime base (Ubuntu 22.04 + its python3.11); torch from the PyTorch CUDA index.
#   WITH_TRAIN=true|false   false builds an API-only image: no torch/transformers/peft (about 10x smaller).
#   TORCH_VERSION, TORCH_CUDA   which torch wheel ("2.7.1" + "cu126" or "cpu").
#   PYTHON_IMAGE, CUDA_IMAGE    base images, pinned by tag; pin them by digest in your own registry mirror.
#
#   docker build -t alignd:cpu .
#   docker build -t alignd:api --build-arg WITH_TRAIN=false .
#   docker build -t alignd:cuda --build-arg VARIANT=cuda .
#
# Needs BuildKit (default since Docker 23): the runtime stage bind-mounts the builder's wheels instead of
# copying them, so the (multi-GB for CUDA) wheels never become a layer of the final image.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04

# --------------------------------------------------------------------------------------------------------------
# builder: build every wheel the runtime needs (client SDK, server, and all their dependencies).
# --------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT
ARG WITH_TRAIN=true
ARG TORCH_VERSION=2.7.1
ARG TORCH_CUDA=cu126
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# The SDK first: the server distribution depends on it (`alignd`), and it changes less often.
COPY client/ client/
COPY pyproject.toml README.md ./
COPY alignd_server/ alignd_server/
COPY contract/ contract/
COPY service/ service/
COPY workers/ workers/

# Extras: production always; train (torch, transformers, peft) unless WITH_TRAIN=false. torch is pinned with a
# local version label (+cpu / +cu126) so that only the PyTorch index can satisfy it, never PyPI's default build.
RUN set -eux; \
    case "${VARIANT}" in \
      cpu)  torch_flavor=cpu ;; \
      cuda) torch_flavor="${TORCH_CUDA}" ;; \
      *) echo "VARIANT must be cpu or cuda, got '${VARIANT}'" >&2; exit 2 ;; \
    esac; \
    extras=production; torch_args=(); \
    if [ "${WITH_TRAIN}" = "true" ]; then \
      extras=production,train; \
      torch_args=(--extra-index-url "https://download.pytorch.org/whl/${torch_flavor}" \
                  "torch==${TORCH_VERSION}+${torch_flavor}"); \
    fi; \
    pip wheel --no-cache-dir --wheel-dir /wheels "${torch_args[@]}" ./client ".[${extras}]"; \
    echo "${extras}" > /wheels/EXTRAS; \
    ls -1 /wheels

# --------------------------------------------------------------------------------------------------------------
# runtime bases: the one picked by VARIANT is built; BuildKit skips the other.
# --------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV BASE_PYTHON=/usr/local/bin/python3.11

FROM ${CUDA_IMAGE} AS base-cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu 22.04's python3.11 (the CUDA libraries themselves come with the torch wheels and the base image).
# Package versions are left to the pinned base image's archive snapshot so that security updates apply.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV BASE_PYTHON=/usr/bin/python3.11

# --------------------------------------------------------------------------------------------------------------
# runtime
# --------------------------------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
ARG WITH_TRAIN=true
ARG ALIGND_UID=10001
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

LABEL org.opencontainers.image.title="alignd" \
      org.opencontainers.image.description="Self-hosted alignment-as-a-service (API + GPU workers)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/alignd/alignd" \
      io.alignd.variant="${VARIANT}" \
      io.alignd.with-train="${WITH_TRAIN}"

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    ALIGND_DATA_DIR=/var/lib/alignd \
    ALIGND_LOG_JSON=true \
    HF_HOME=/var/cache/alignd/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HEALTHCHECK_URL=http://127.0.0.1:8000/healthz

# A fixed, non-root UID/GID (10001) so that Kubernetes' runAsUser/fsGroup and volume ownership line up.
RUN groupadd --system --gid "${ALIGND_UID}" alignd \
 && useradd --system --uid "${ALIGND_UID}" --gid "${ALIGND_UID}" --home-dir /var/lib/alignd \
      --no-create-home --shell /usr/sbin/nologin alignd \
 && mkdir -p /var/lib/alignd /var/cache/alignd \
 && chown -R "${ALIGND_UID}:${ALIGND_UID}" /var/lib/alignd /var/cache/alignd

# Install from the builder's wheels only (--no-index): the runtime stage never reaches a package index.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    set -eux; \
    "${BASE_PYTHON}" -m venv /opt/venv; \
    extras="$(cat /wheels/EXTRAS)"; \
    /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels \
      alignd "alignd-server[${extras}]"; \
    /opt/venv/bin/alignd-server --help > /dev/null

WORKDIR /var/lib/alignd
USER ${ALIGND_UID}:${ALIGND_UID}
VOLUME ["/var/lib/alignd"]
EXPOSE 8000 9100

# No curl in the image: python's urllib checks /healthz. Workers set HEALTHCHECK_URL to their metrics port
# (http://127.0.0.1:9100/metrics). Kubernetes ignores HEALTHCHECK and uses the chart's probes instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["alignd-server"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
