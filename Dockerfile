# Inflow worker image (CPU by default; INFLOW_EXTRAS=dev,gpu adds TensorRT for the gpu profile).
FROM python:3.11-slim
ARG INFLOW_EXTRAS=dev
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY engines ./engines
COPY indexer ./indexer
COPY schemas ./schemas
RUN pip install --no-cache-dir ".[${INFLOW_EXTRAS}]"
RUN useradd --create-home --uid 1000 inflow && mkdir -p /var/lib/inflow && chown inflow /var/lib/inflow
USER inflow
EXPOSE 6066
CMD ["inflow", "worker"]
