# jupybox images. Build the sandbox (what the docker backend runs) with:
#   docker build --target sandbox -t jupybox-sandbox:latest .
# or from Python: sandbox.build.build_image(), which also caches by content and finds a base image
# on hosts that cannot pull one.
#
# BASE_IMAGE needs a Debian bookworm userland with python3 (3.11) and apt: the official
# python:3.11-slim-bookworm, or a debootstrap-made base whose python3 lives in /usr/bin.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# sandbox-venv: the kernel's virtualenv, built apart so that pip, its caches and any extra CA
# certificate given to the build stay out of the sandbox image.
FROM ${BASE_IMAGE} AS sandbox-venv
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# build-ca.pem is optional (the wildcard matches nothing in a plain checkout): build_image() adds
# it when the host trusts an extra CA for HTTPS (PIP_CERT, REQUESTS_CA_BUNDLE, SSL_CERT_FILE).
COPY sandbox/image/requirements.txt build-ca.pe[m] /tmp/build/
# Debian's own python3 needs python3-venv for ensurepip; python:3.11-slim has it built in.
RUN set -eu; \
    if ! python3 -m venv /opt/jupybox/venv; then \
        rm -rf /opt/jupybox/venv; \
        apt-get update; \
        apt-get install -y --no-install-recommends python3-venv; \
        python3 -m venv /opt/jupybox/venv; \
    fi; \
    if [ -f /tmp/build/build-ca.pem ]; then export PIP_CERT=/tmp/build/build-ca.pem; fi; \
    /opt/jupybox/venv/bin/pip install --only-binary=:all: -r /tmp/build/requirements.txt; \
    # The packages' own test suites are a fifth of the stack (pandas' alone is 45 MB) and no
    # runtime code imports them.
    find /opt/jupybox/venv/lib -type d -name tests -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
# sandbox: one container per session runs this, read-only, as uid 70000 (a uid that owns nothing on
# a usual host), with a tmpfs at /tmp.
FROM ${BASE_IMAGE} AS sandbox
LABEL org.opencontainers.image.title="jupybox-sandbox" \
      org.opencontainers.image.description="Jupyter kernel with a data-analysis stack, run by jupybox in an isolated container" \
      org.opencontainers.image.licenses="Apache-2.0" \
      jupybox.image="sandbox"

# A CJK font (fonts-wqy-microhei, 4 MB) so plots can carry Chinese text. The user gets the
# uid/gid the backend runs as; useradd is absent from a minbase root, hence the fallback.
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends fonts-wqy-microhei; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    if command -v useradd >/dev/null; then \
        groupadd --gid 70000 sandbox; \
        useradd --no-log-init --uid 70000 --gid 70000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin sandbox; \
    else \
        echo 'sandbox:x:70000:' >> /etc/group; \
        echo 'sandbox:x:70000:70000:jupybox sandbox:/tmp:/usr/sbin/nologin' >> /etc/passwd; \
    fi; \
    mkdir -p /mnt/data; \
    chown 70000:70000 /mnt/data

COPY --from=sandbox-venv /opt/jupybox/venv /opt/jupybox/venv

# pipshim first: `pip` and `python -m pip` ask jupybox to install from the server's wheelhouse (the
# sandbox has no network); the venv's real pip stays for the image's own build steps only.
ENV PATH=/opt/jupybox/pipshim/bin:/opt/jupybox/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONPATH=/opt/jupybox/pipshim \
    JUPYBOX_SITE=/opt/jupybox/site \
    LANG=C.UTF-8 \
    HOME=/tmp \
    IPYTHONDIR=/tmp/.ipython \
    PYTHONDONTWRITEBYTECODE=1 \
    MATPLOTLIBRC=/opt/jupybox/matplotlibrc \
    MPLCONFIGDIR=/tmp/matplotlib \
    JUPYBOX_MPL_SEED=/opt/jupybox/matplotlib

# The root filesystem is read-only at run time and /tmp starts empty: build matplotlib's font
# cache now; kernel_boot.py copies it to MPLCONFIGDIR before the kernel starts.
COPY sandbox/image/matplotlibrc /opt/jupybox/matplotlibrc
RUN set -eu; \
    MPLCONFIGDIR=/opt/jupybox/matplotlib python -c "import matplotlib.font_manager as fm; \
names = {f.name for f in fm.fontManager.ttflist}; \
assert 'WenQuanYi Micro Hei' in names, sorted(names)"; \
    chmod -R u=rwX,go=rX /opt/jupybox/matplotlib

COPY sandbox/image/kernel_boot.py /opt/jupybox/kernel_boot.py
COPY sandbox/image/pipshim /opt/jupybox/pipshim
# the session's installed packages are mounted here, read-only (see sandbox/packages.py)
RUN mkdir -p /opt/jupybox/site

USER 70000:70000
WORKDIR /mnt/data
# The docker backend passes its own command (kernel_boot.py with a connection file).
CMD ["python"]

# =============================================================================================
# The service: `jupybox serve` (browser UI, JSON API, OpenAI-compatible endpoint). Build with
#   docker build --target app -t jupybox-app:latest .
# or `jupybox sandbox build-image --target app` (cached by content, base image found or made as
# for the sandbox). It starts sandbox containers through the host's Docker daemon: mount
# /var/run/docker.sock and give it a JUPYBOX_HOME that is the same path inside and on the host
# (compose.yaml does both; the README's "Deploy with Docker" says why).
# With Docker's legacy builder every stage above is built too (from its cache, usually); BuildKit
# builds only the two below.

# ---------------------------------------------------------------------------------------------
# app-venv: the project and its runtime dependencies (no dev or local-model extras: no torch),
# in a virtualenv built apart so that pip, setuptools and their caches stay out of the app image.
FROM ${BASE_IMAGE} AS app-venv
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY pyproject.toml build-ca.pe[m] /tmp/build/
# The dependencies first, read from pyproject.toml: this layer stays cached while only the
# sources change.
RUN set -eu; \
    if ! python3 -m venv /opt/jupybox/app; then \
        rm -rf /opt/jupybox/app; \
        apt-get update; \
        apt-get install -y --no-install-recommends python3-venv; \
        python3 -m venv /opt/jupybox/app; \
    fi; \
    if [ -f /tmp/build/build-ca.pem ]; then export PIP_CERT=/tmp/build/build-ca.pem; fi; \
    python3 -c "import tomllib; \
print('\n'.join(tomllib.load(open('/tmp/build/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/build/requirements.txt; \
    /opt/jupybox/app/bin/pip install --prefer-binary 'setuptools>=68' -r /tmp/build/requirements.txt
COPY store /tmp/build/src/store
COPY sandbox /tmp/build/src/sandbox
COPY interpreter /tmp/build/src/interpreter
COPY ui /tmp/build/src/ui
COPY bench /tmp/build/src/bench
# README.md is the package's long description only: an empty one keeps README edits from
# rebuilding the image. Then the build tools leave the virtualenv; pip stays: the server installs
# packages from the wheelhouse into sessions with it (`jupybox packages`, sandbox/packages.py).
RUN set -eu; \
    cp /tmp/build/pyproject.toml /tmp/build/src/; \
    : > /tmp/build/src/README.md; \
    /opt/jupybox/app/bin/pip install --no-deps --no-build-isolation /tmp/build/src; \
    /opt/jupybox/app/bin/pip uninstall -y setuptools wheel; \
    find /opt/jupybox/app/lib -type d -name tests -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
# app: runs as uid 1000 (the entrypoint starts as root only to give that user the Docker socket's
# group and the data folder, then drops every privilege; see deploy/entrypoint.sh).
FROM ${BASE_IMAGE} AS app
LABEL org.opencontainers.image.title="jupybox" \
      org.opencontainers.image.description="jupybox serve: a sandboxed code interpreter (browser UI, HTTP API, OpenAI-compatible endpoint)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      jupybox.image="app"

RUN set -eu; \
    if command -v useradd >/dev/null; then \
        groupadd --gid 1000 jupybox; \
        useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin jupybox; \
    else \
        echo 'jupybox:x:1000:' >> /etc/group; \
        echo 'jupybox:x:1000:1000:jupybox:/tmp:/usr/sbin/nologin' >> /etc/passwd; \
    fi; \
    mkdir -p /var/lib/jupybox; \
    chown 1000:1000 /var/lib/jupybox

COPY --from=app-venv /opt/jupybox/app /opt/jupybox/app
COPY deploy/entrypoint.sh /usr/local/bin/jupybox-entrypoint

# JUPYBOX_HOME must be a path the host's Docker daemon sees as well (the sandboxes bind-mount
# folders under it): mount the host folder of the same name here.
ENV PATH=/opt/jupybox/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    JUPYBOX_HOME=/var/lib/jupybox \
    JUPYBOX_HOST=0.0.0.0 \
    JUPYBOX_PORT=7860 \
    JUPYBOX_BACKEND=docker

EXPOSE 7860
# /healthz answers without a token. Python's urllib, because the image carries no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('JUPYBOX_PORT', '7860'), timeout=4)"]
ENTRYPOINT ["jupybox-entrypoint"]
CMD ["jupybox", "serve"]
