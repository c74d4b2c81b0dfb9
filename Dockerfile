# KubeTune operator image: slim Python, the kubetune package with the [operator] extra only
# (kopf, lightkube; no torch). It runs `python -m kubetune_operator`. Build from the repository root:
#   docker build -t ghcr.io/kubetune/kubetune-operator:0.1.0 .
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer_image/kubetune trainer_image/kubetune
COPY operator/kubetune_operator operator/kubetune_operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "kubetune[operator]" \
    && rm -rf /wheels \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kubetune
USER 10001:10001
# 8080: kopf liveness (/healthz); 8081: Prometheus metrics (/metrics).
EXPOSE 8080 8081
# kopf.run() standalone with liveness on :8080/healthz; KUBETUNE_WATCH_NAMESPACES limits the
# namespaces (the Helm chart sets it and the same command).
ENTRYPOINT ["python", "-m", "kubetune_operator"]
