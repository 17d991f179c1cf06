# One image for workers, Flower and the orchestrator. Replicas of a job return identical bits only
# when they run the same torch build, so every worker in docker-compose.yml runs this image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FARM_DATA_ROOT=/data/datasets

WORKDIR /app

# Dependencies first: the torch layer is large and should survive changes to the project's code.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY . .
RUN pip install --no-deps -e .

# The mount points exist in the image, owned by the runtime user, so that a fresh named volume
# mounted there inherits that owner and the non-root processes can write to it.
RUN useradd --create-home --uid 1000 --user-group farm \
    && mkdir -p /data/datasets /runs /orchestrator-state /orchestrator-public \
    && chown farm:farm /data/datasets /runs /orchestrator-state /orchestrator-public

# /app is not writable by farm, so the CLI's default run directory, runs/RUN_ID, goes to /runs.
RUN ln -s /runs /app/runs

USER farm

CMD ["celery", "-A", "tasks", "worker", "-n", "worker@%h", "--loglevel=INFO"]
