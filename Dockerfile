# lightning-opd images. Two targets:
#   store  `lopd serve` only (local or s3:// stores): no torch, non-root, for a read-only root file system,
#          healthcheck on /readyz
#   full   everything else too: precompute (transformers; CPU torch by default), training, stats, the server
#
#   docker build --target store -t lightning-opd-store .
#   docker build --target full -t lightning-opd .
#   docker build --target full -t lightning-opd:gpu \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg TORCH_VERSION=<one it has> .
#
# BASE_IMAGE: any Debian-like image with Python >= 3.11 and its venv module (CI builds one from Debian's
# packages, scripts/compose_ci.sh). docker-compose.yml builds both targets (`docker compose build`).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 PATH=/opt/venv/bin:$PATH
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin lopd

# Dependencies first, read from pyproject.toml alone: editing the code does not rebuild this layer.
# pip's cache is a build cache mount (kept between builds, never in the image).
FROM python AS deps-store
COPY pyproject.toml deploy/requirements.py /tmp/lopd-build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
 && python3 /tmp/lopd-build/requirements.py /tmp/lopd-build/pyproject.toml server s3 > /tmp/lopd-build/requirements.txt \
 && pip install -r /tmp/lopd-build/requirements.txt \
 && rm -rf /tmp/lopd-build

FROM python AS deps-full
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Pinned, as scripts/setup.sh pins it: an open range lets pip pick a multi-GB CUDA build from PyPI.
ARG TORCH_VERSION=2.13.0
COPY pyproject.toml deploy/requirements.py /tmp/lopd-build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
 && pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION" \
 && python3 /tmp/lopd-build/requirements.py /tmp/lopd-build/pyproject.toml server teacher train s3 \
      > /tmp/lopd-build/requirements.txt \
 && pip install -r /tmp/lopd-build/requirements.txt \
 && rm -rf /tmp/lopd-build

# The project itself, as a wheel: the images install it over their dependency layer, so a code change
# costs a small layer, not a copy of the whole environment.
FROM python AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lopd lopd
COPY storage storage
COPY server server
COPY client client
COPY pipeline pipeline
COPY integrations integrations
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /tmp/build-venv && /tmp/build-venv/bin/pip wheel --no-deps --wheel-dir /wheels /src

# Never root. docker-compose.yml runs it with a read-only root file system and the store mounted read-only
# (except its .readers folder: the server's reader lease, so `lopd gc` never removes a version it serves).
FROM deps-store AS store
COPY --from=wheel /wheels /tmp/wheels
# (pip compiles the bytecode, so nothing is written at run time)
RUN pip install --no-deps --no-index /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER lopd
WORKDIR /home/lopd
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["lopd"]
CMD ["serve", "/store", "--host", "0.0.0.0", "--port", "8000"]

FROM deps-full AS full
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps --no-index /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER lopd
WORKDIR /home/lopd
EXPOSE 8000
ENTRYPOINT ["lopd"]
CMD ["--help"]
