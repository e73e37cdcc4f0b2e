# cellstream: streaming inference for recurrent cells over gRPC.
#
#   docker build -t cellstream .            (or: podman build --format docker -t cellstream .)
#   docker run -p 50051:50051 -p 9095:9095 -v cellstream-state:/var/lib/cellstream cellstream
#
# Stage 1 builds the wheels of cellstream and of all its dependencies; stage 2 installs them
# into a venv on a fresh base, without a compiler, pip cache or build context.
# BASE_IMAGE must provide python3 (3.11+) with the venv module and useradd; see
# deploy/container/setup-podman.sh for a local Debian base built without a registry.
# RUN --mount needs BuildKit (the default builder since Docker 23) or buildah/podman.
# Operations guide: docs/operations.md.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
RUN python3 -m venv /opt/build-venv
COPY . /src
# The pip cache mount keeps downloaded dependencies across rebuilds (BuildKit and buildah).
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/build-venv/bin/pip wheel --wheel-dir /wheels /src \
    && sha256sum /wheels/*.whl >/wheels.sha256

FROM ${BASE_IMAGE}
ARG CELLSTREAM_UID=10001
LABEL org.opencontainers.image.title="cellstream" \
      org.opencontainers.image.description="Streaming inference for recurrent cells over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it (deploy/k8s uses the same id).
RUN useradd --system --no-log-init --uid "${CELLSTREAM_UID}" --user-group \
        --create-home --home-dir /home/cellstream --shell /usr/sbin/nologin cellstream \
    && mkdir -p /var/lib/cellstream \
    && chown "${CELLSTREAM_UID}:${CELLSTREAM_UID}" /var/lib/cellstream \
    && chmod 0750 /var/lib/cellstream

# Install from the wheels of stage 1 only (no index): what was built is what runs.  The
# wheels are bind-mounted, not copied, so they add nothing to the image; their checksum list
# is copied first so that any change to them invalidates the layer cache of the install (and
# it stays in the image as the record of what was installed).  pip is removed afterwards.
COPY --from=build /wheels.sha256 /opt/cellstream.wheels.sha256
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    sha256sum --check --quiet /opt/cellstream.wheels.sha256 \
    && python3 -m venv /opt/cellstream \
    && /opt/cellstream/bin/pip install --no-cache-dir --no-index --find-links /wheels /wheels/cellstream-*.whl \
    && /opt/cellstream/bin/pip uninstall --yes pip setuptools \
    && /opt/cellstream/bin/cellstream --help >/dev/null

# The bundled models, also at a fixed path: mount a directory over /models to serve your own
# (or point CELLSTREAM_MODELS elsewhere).
COPY models /models

ENV PATH=/opt/cellstream/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CELLSTREAM_ADDRESS=0.0.0.0:50051 \
    CELLSTREAM_METRICS_ADDRESS=0.0.0.0:9095 \
    CELLSTREAM_STATE_DIR=/var/lib/cellstream \
    CELLSTREAM_MODELS=/models

USER ${CELLSTREAM_UID}:${CELLSTREAM_UID}
WORKDIR /var/lib/cellstream
VOLUME ["/var/lib/cellstream"]
# 50051: gRPC (CellStream, grpc.health.v1, reflection); 9095: Prometheus metrics at /metrics.
EXPOSE 50051 9095

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["cellstream", "health", "--address", "127.0.0.1:50051", "--timeout", "3"]

# cellstream handles SIGTERM itself (NOT_SERVING, drain, final snapshot, exit 0): it runs as
# PID 1 directly, no init or shell wrapper.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cellstream"]
CMD ["serve"]
