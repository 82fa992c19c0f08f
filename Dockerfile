# The one image of the service: `wkvq serve` (API), `wkvq worker` (GPU worker), `wkvq migrate`, `wkvq admin ...`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf

WORKDIR /app

# torch first, in its own layer (large, rarely changes). This is the CPU build. For the GPU workers swap it for a
# CUDA build of the same version, e.g. `docker compose build --build-arg
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128` (pick the CUDA version your host driver supports).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

# then every other dependency from the lock (exact versions, sha256 checked; torch, installed above, is not in it),
# in a layer that changes only with the lock; then the project itself, resolving nothing
COPY requirements/service.txt requirements/service.txt
RUN pip install --require-hashes -r requirements/service.txt
COPY . .
RUN pip install --no-deps --no-build-isolation .

# an unprivileged user owning the mount points, so fresh named volumes are writable by it
RUN useradd --create-home --uid 1000 wkvq \
    && mkdir -p /data/store /data/hf /models \
    && chown -R wkvq:wkvq /data /models
USER wkvq

EXPOSE 8000
ENTRYPOINT ["wkvq"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
