# syntax=docker/dockerfile:1
# The agentgov collector, built from this checkout with the locked dependencies.
# The image keeps the checkout (installed editable), so `agentgov dashboards push` finds the
# dashboards/ folder in it:  docker compose run --rm collector dashboards push ...
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.11.13-slim-bookworm
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /app

# dependencies first: this layer is rebuilt only when the lock file changes
COPY pyproject.toml uv.lock ./
COPY instrumentation/pyproject.toml instrumentation/pyproject.toml
COPY collector/pyproject.toml collector/pyproject.toml
RUN uv sync --frozen --no-dev --no-install-workspace

COPY . .
RUN uv sync --frozen --no-dev \
    && useradd --system --uid 10001 --no-create-home --home-dir /app agentgov
USER agentgov

EXPOSE 4318 4317
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=10 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:4318/healthz', timeout=3)"]
ENTRYPOINT ["agentgov"]
CMD ["collector", "--host", "0.0.0.0"]
