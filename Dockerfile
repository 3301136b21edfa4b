# lightning-opd image: the store server, the trainer and CPU/GPU precompute with transformers.
#   docker build -t lightning-opd .                        (CPU torch)
#   docker build -t lightning-opd:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

WORKDIR /opt/lightning-opd
COPY pyproject.toml README.md ./
COPY lopd lopd
COPY storage storage
COPY server server
COPY client client
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch \
 && pip install --no-cache-dir ".[server,teacher]" \
 && useradd --create-home --uid 10001 lopd

# Never root: the store is mounted read-only for serving, and jobs write only where they are told.
USER lopd
EXPOSE 8000
ENTRYPOINT ["lopd"]
CMD ["--help"]
