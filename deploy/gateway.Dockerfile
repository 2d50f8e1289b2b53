# The gateway image: ONNX Runtime only, no torch, every dependency pinned by hash
# (deploy/requirements/gateway-*.txt, `make locks`). Build from the repository root:
#   docker build -f deploy/gateway.Dockerfile -t cascade-gateway .                    # CPU
#   docker build -f deploy/gateway.Dockerfile --build-arg ORT=gpu -t cascade-gateway:gpu .
# The GPU build takes CUDA 12 and cuDNN 9 from pip (onnxruntime-gpu[cuda,cudnn]), so the base
# stays this slim one: the node gives the driver (NVIDIA container toolkit, driver >= 525), and
# with no GPU visible the student runs on the CPU (CASCADE_STUDENT_DEVICE=auto).
# Base pinned to the exact patch release; pin its digest in your registry mirror.
FROM python:3.11.10-slim-bookworm
ARG ORT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
COPY deploy/requirements/gateway-${ORT}.txt /tmp/requirements.txt
RUN pip install --require-hashes --no-deps -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY cascade_server ./cascade_server
# The project itself without dependencies: the lock above is the whole environment.
# /state belongs to the runtime user: a named volume mounted there starts as a copy of this
# directory, owner included (else the first admin change fails with EACCES).
RUN pip install --no-deps . \
    && mkdir -p /state /tmp/cascade \
    && chown 65534:65534 /state /tmp/cascade
# Bundles are mounted or baked in; runtime control lives in Redis (or the state volume).
ENV CASCADE_BUNDLES=/bundles/digits,/bundles/intents \
    CASCADE_STATE_DIR=/state \
    CASCADE_STUDENT_DEVICE=auto \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 8000
USER 65534:65534
# Liveness only: /healthz never waits on the teacher (no curl in the slim image).
HEALTHCHECK --interval=10s --timeout=2s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["cascade-serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--workdir", "/tmp/cascade"]
