# One image for every optrack service of docker-compose.yml (migrate, worker, beat, sandbox).
FROM python:3.12-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md alembic.ini ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir -e . && useradd --create-home --uid 1000 optrack \
    && mkdir -p /var/lib/optrack && chown optrack /var/lib/optrack
USER optrack
CMD ["optrack", "--help"]
