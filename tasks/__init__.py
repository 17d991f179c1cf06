"""The farm's Celery app and worker-side code.

Start a worker with a unique name:

    celery -A tasks worker -n alice@%h --loglevel=INFO

It reads FARM_BROKER_URL (default redis://127.0.0.1:6379/0), FARM_STORE_URL (default: the
broker) and FARM_DATA_ROOT (datasets in torchvision's layout). torch is imported only in the
pool child, never in the parent that forks it.
"""

from tasks.app import app
from tasks import jobs, worker  # noqa: F401  (register the task, signals and bootsteps)

__all__ = ["app"]
