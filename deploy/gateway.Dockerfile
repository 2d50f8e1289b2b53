# The gateway image: ONNX Runtime only, no torch. Build from the repository root:
#   docker build -f deploy/gateway.Dockerfile --build-arg ORT=gpu -t cascade-gateway .
FROM python:3.11.10-slim-bookworm
ARG ORT=cpu
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cascade_server ./cascade_server
RUN pip install --no-cache-dir ".[${ORT}]" \
    # /state belongs to the runtime user: a named volume mounted there starts as a copy of
    # this directory, owner included (else the first admin change fails with EACCES).
    && mkdir -p /state /tmp/cascade && chown 65534:65534 /state /tmp/cascade
# Bundles are mounted or baked in; thresholds persist in the state volume.
ENV CASCADE_BUNDLES=/bundles/digits,/bundles/intents \
    CASCADE_STATE_DIR=/state \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics
EXPOSE 8000
USER 65534:65534
# Liveness only: /healthz never waits on the teacher (no curl in the slim image).
HEALTHCHECK --interval=10s --timeout=2s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["cascade-serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--workdir", "/tmp/cascade"]
