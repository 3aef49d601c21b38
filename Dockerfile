# quill's image for the team stack (docker-compose.yml): the MLflow server, the Prefect server and worker, the Ray
# head. The environment is requirements.lock (CPU torch by default); --build-arg TORCH_VARIANT=cu128 installs the
# CUDA build of the same torch version instead. The server extras (PostgreSQL driver, S3 client, DVC's S3 remote)
# are pinned here: a laptop never needs them.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VARIANT=cpu
ARG SERVER_EXTRAS="psycopg2-binary==2.9.13 boto3==1.44.8 dvc-s3==3.3.0"

RUN apt-get update \
    && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock ./
RUN sed -i "s/^torch==\([0-9.]*\)+cpu$/torch==\1+${TORCH_VARIANT}/" requirements.lock \
    && pip install --no-cache-dir --disable-pip-version-check \
        --extra-index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" -r requirements.lock \
    && pip install --no-cache-dir --disable-pip-version-check ${SERVER_EXTRAS}

COPY . .
# DVC needs a git repository for the workspace; the image's is a snapshot of the build context.
RUN git init -q && git add -A && git -c user.name=quill -c user.email=quill@localhost commit -qm "image snapshot" \
    && useradd --create-home --uid 1000 quill && mkdir -p /workspace && chown -R quill /app /workspace
USER quill
ENV PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
EXPOSE 4200 5000 6379 8000 8265
CMD ["python", "-m", "flows.deploy"]
