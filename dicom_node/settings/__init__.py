"""Typed node configuration: the schema (`schema.py`) and how it is read (`loader.py`)."""

from dicom_node.settings.loader import load_settings
from dicom_node.settings.schema import (
    SEARCH_PREFIX,
    AETitle,
    ConfigError,
    Destination,
    ExportSettings,
    LoggingSettings,
    NodeSettings,
    OutputSettings,
    RoutingRule,
    SeriesSettings,
    Settings,
    StorageSettings,
    TlsSettings,
    WorkerSettings,
)

__all__ = [
    "SEARCH_PREFIX",
    "AETitle",
    "ConfigError",
    "Destination",
    "ExportSettings",
    "LoggingSettings",
    "NodeSettings",
    "OutputSettings",
    "RoutingRule",
    "SeriesSettings",
    "Settings",
    "StorageSettings",
    "TlsSettings",
    "WorkerSettings",
    "load_settings",
]
