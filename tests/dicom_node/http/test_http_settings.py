"""The [http] section is documented; the Grafana dashboard uses only metrics the node has; /metrics degrades."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dicom_node.metrics import JobStoreCollector, NodeMetrics
from dicom_node.settings.schema import HttpSettings
from tests.dicom_node.conftest import EXAMPLE_CONFIG

DOCS = Path(__file__).resolve().parents[3] / "docs"


def test_example_config_documents_every_http_key() -> None:
    text = EXAMPLE_CONFIG.read_text()
    section = text[text.index("[http]") :]
    missing = [key for key in HttpSettings.model_fields if f"{key} =" not in section and f"http.{key}]" not in section]
    assert missing == []
    assert "enabled = true\n" in section and 'host = "127.0.0.1"' in section and "port = 8080" in section


def test_grafana_dashboard_queries_only_exported_metrics(tmp_path: Path) -> None:
    from storage.database import Database

    metrics = NodeMetrics()
    metrics.add_collector(JobStoreCollector(Database(f"sqlite:///{tmp_path}/db.sqlite"), lambda: 1, 0))
    names = {family.name for family in metrics.registry.collect()}
    exported = names | {f"{n}_total" for n in names} | {f"{n}_bucket" for n in names}
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"dicom_node_[a-z_]+", target["expr"])
    }
    assert used and used <= exported, used - exported


def test_metrics_survive_an_unreadable_job_store(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from storage.database import Database

    db = Database(f"sqlite:///{tmp_path}/db.sqlite")
    metrics = NodeMetrics()
    metrics.add_collector(JobStoreCollector(db, lambda: 12345, 0))
    assert b"dicom_node_job_store_up 1.0" in generate_latest(metrics.registry)
    with db.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE job_events")
    text = generate_latest(metrics.registry)
    assert b"dicom_node_job_store_up 0.0" in text and b"dicom_node_disk_free_bytes 12345.0" in text
