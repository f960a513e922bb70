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
# The image listens on 0.0.0.0, so it needs a key (README, "Access control") or it refuses to
# start; run it with one, e.g.
#   docker run -e TASKCAST_REDIS_URL=redis://redis:6379/0 \
#              -e TASKCAST_JWT_SECRET="$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')" \
#              -p 8000:8000 taskcast
# or mount a PEM public key and set TASKCAST_JWT_PUBLIC_KEY_FILE. TASKCAST_AUTH=off opens every
# task to whoever reaches the port: only behind something that checks access itself.
ENTRYPOINT ["taskcast", "serve"]
