# The gateway image: ONNX Runtime only, no torch. Build from the repository root:
#   docker build -f deploy/gateway.Dockerfile --build-arg ORT=gpu -t cascade-gateway .
FROM python:3.11-slim
ARG ORT=cpu
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cascade_server ./cascade_server
RUN pip install --no-cache-dir ".[${ORT}]"
# Bundles are mounted or baked in; thresholds persist in the state volume.
ENV CASCADE_BUNDLES=/bundles/digits,/bundles/intents \
    CASCADE_STATE_DIR=/state \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics
EXPOSE 8000
USER 65534
CMD ["cascade-serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--workdir", "/tmp/cascade"]
