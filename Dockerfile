# syntax=docker/dockerfile:1.7
# csmf-retrieval serving image: no torch (the core install serves), non-root, `csmf serve` as entrypoint.
#
#   docker build -t csmf-retrieval:local .                       # bundle mounted at /bundle at run time
#   docker run --rm -p 8000:8000 -v "$PWD/bundles/ml-100k:/bundle:ro" csmf-retrieval:local
#
#   # or bake a bundle into the image (immutable; what deploy/k8s/ runs):
#   docker build --target baked --build-context bundle=bundles/ml-100k -t csmf-retrieval:ml-100k .
#
# Expected size: ~0.5 GB uncompressed. The same package set installed outside Docker (the core
# dependencies of pyproject.toml, no `train` extra) is a 400 MB venv, pip included; python:3.11-slim
# is ~125 MB. pyarrow (~170 MB) and numpy + faiss (~140 MB) dominate. The service never imports
# torch (the user tower runs in numpy); training and `csmf build-index` need the `train` extra and
# are not in this image (they exit with a one-line message saying so). Before the split the venv
# was 1.05 GB, CPU torch alone ~560 MB.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# Dependencies in their own layer, keyed on pyproject.toml only, so a code change does not
# reinstall them. Only the core dependencies: no torch.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY csmf ./csmf
COPY trainer ./trainer
COPY index_builder ./index_builder
COPY service ./service
COPY daily ./daily
COPY bench/harness ./bench/harness
# Then check the serving path imports without torch, and drop pip/setuptools themselves.
RUN pip install --no-deps . \
    && python -c "import csmf, service.main, sys; assert 'torch' not in sys.modules" \
    && python -m pip uninstall -y -q pip setuptools wheel

# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime-base

# One fixed uid so a mounted bundle or volume can be owned/readable by it on the host.
RUN groupadd --system --gid 10001 csmf \
    && useradd --system --uid 10001 --gid csmf --home-dir /srv/csmf --create-home \
        --shell /usr/sbin/nologin csmf \
    && install -d -o 10001 -g 10001 /data
# /data: the event log (CSMF_EVENT_LOG_DIR) on a volume, which Docker creates owned like this.

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Writable working directory for the embedded weight store's file (.cache/csmf/scenarios.json,
# unused when CSMF_REDIS_URL is set). `csmf serve --workers N` keeps its multi-process metric
# files under $TMPDIR (/tmp). Everything else in the image is read-only to the service user.
WORKDIR /srv/csmf
USER 10001:10001
EXPOSE 8000

# /healthz is liveness (the process answers); readiness (/readyz) is for the orchestrator.
# python + urllib: the slim image has no curl, and a non-2xx or refused connection exits 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

ENTRYPOINT ["csmf", "serve"]
CMD ["--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# The training image (`--target train`): the same venv plus CPU torch, for `csmf daily` (the
# Kubernetes CronJob, the compose service `csmf-daily`) and any other training command.
FROM build AS build-train
ARG TORCH=torch==2.13.0
RUN python -m ensurepip -q \
    && pip install --index-url https://download.pytorch.org/whl/cpu "$TORCH" \
    && python -c "import torch, daily.update" \
    && python -m pip uninstall -y -q pip setuptools wheel

FROM runtime-base AS train
COPY --from=build-train /opt/venv /opt/venv
# The training configs, for the first update (`csmf daily --config configs/...`).
COPY configs ./configs
HEALTHCHECK NONE
ENTRYPOINT ["csmf"]
CMD ["daily", "--help"]

# ---------------------------------------------------------------------------------------------
# A bundle baked in from a named build context (`--build-context bundle=PATH`), so bundles never
# enter the main build context (.dockerignore keeps them out). Built only with --target baked.
FROM runtime-base AS baked
COPY --from=bundle . /bundle

# ---------------------------------------------------------------------------------------------
# The default target: the bundle is mounted read-only at /bundle.
FROM runtime-base AS runtime
