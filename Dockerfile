# taskcast gateway image. Docker cannot run on the development machines, so this file is kept
# plain and conventional; build with `docker build -t taskcast .`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TASKCAST_HOST=0.0.0.0 \
    TASKCAST_PORT=8000

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
# The exact dependency versions the tests and benchmarks ran with (constraints.txt).
RUN pip install -c constraints.txt . && useradd --system --uid 10001 taskcast

USER taskcast
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"

# Configuration comes from TASKCAST_* variables (see README), e.g. TASKCAST_REDIS_URL.
ENTRYPOINT ["taskcast", "serve"]
