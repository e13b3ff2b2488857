# One image for every specdec service: compose.yaml runs `python -m verifier_svc`, `python -m proposer_svc`
# or `python -m scheduler_svc` in it, configured by SPECDEC_* environment variables. Checkpoints are not
# baked in: compose mounts them under /models (docs/deploy.md).
FROM python:3.11-slim

# CPU wheels by default; pass a CUDA index (e.g. https://download.pytorch.org/whl/cu128) for GPU hosts.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch in its own layer: it is the big one and changes least. "2.13.0+cpu" satisfies the ==2.13.0 pin.
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0

COPY pyproject.toml README.md ./
COPY proto ./proto
COPY scripts/gen_proto.py ./scripts/gen_proto.py
COPY specdec ./specdec
COPY specdec_client ./specdec_client
COPY verifier_svc ./verifier_svc
COPY proposer_svc ./proposer_svc
COPY scheduler_svc ./scheduler_svc
# The gRPC code is generated (specdec/pb is not in the source tree), then the package is installed.
RUN pip install grpcio-tools==1.85.1 && python scripts/gen_proto.py && pip install .

# Services run as an unprivileged user; the model folders are mounted read-only.
RUN useradd --create-home --uid 10001 specdec
USER specdec
EXPOSE 50051 9464
CMD ["python", "-m", "scheduler_svc"]
