# One image for every specdec service: compose.yaml runs `python -m verifier_svc`, `python -m proposer_svc`
# or `python -m scheduler_svc` in it, configured by SPECDEC_* environment variables. Checkpoints are not
# baked in: compose mounts them under /models (docs/deploy.md).
#
# Two stages: `build` generates the gRPC stubs (grpcio-tools) and builds the specdec wheel; `runtime` installs
# torch and that wheel with its runtime dependencies only: no compilers, no grpcio-tools, no test or
# benchmark packages. The base is python:3.11-slim pinned by digest (the multi-arch index of the official
# image); bump both stages together.

FROM python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The build extra's pin (pyproject.toml; tests/test_image.py keeps the two equal).
RUN pip install --no-cache-dir grpcio-tools==1.85.1
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY scripts/gen_proto.py ./scripts/gen_proto.py
COPY specdec ./specdec
COPY specdec_client ./specdec_client
COPY verifier_svc ./verifier_svc
COPY proposer_svc ./proposer_svc
COPY scheduler_svc ./scheduler_svc
# specdec/pb is generated, not in the source tree; the wheel carries it.
RUN python scripts/gen_proto.py && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff AS runtime

# CPU wheels by default; compose.gpu.yaml passes a CUDA index (https://download.pytorch.org/whl/cu128).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch in its own layer: it is the big one and changes least. "2.13.0+cpu" satisfies the ==2.13.0 pin, so
# installing the wheel below keeps it.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels

# Services run as an unprivileged user (numeric, so that the runtime can check it is not root); the model
# folders are mounted read-only.
RUN useradd --create-home --uid 10001 specdec
USER 10001
WORKDIR /home/specdec
EXPOSE 50051 8000 9464
CMD ["python", "-m", "scheduler_svc"]
