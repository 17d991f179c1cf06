"""The Celery application shared by workers, the orchestrator and Flower."""

from celery import Celery

from config.celery import celery_settings
from config.settings import broker_url_from_env

app = Celery("farm")
app.conf.update(celery_settings(broker_url_from_env()))
