"""Settings shared by the orchestrator and the workers."""

from config.settings import (
    DATASETS,
    FarmSettings,
    SettingsError,
    TrainingSettings,
    broker_url_from_env,
    data_root_from_env,
    store_url_from_env,
)

__all__ = [
    "DATASETS",
    "FarmSettings",
    "SettingsError",
    "TrainingSettings",
    "broker_url_from_env",
    "data_root_from_env",
    "store_url_from_env",
]
