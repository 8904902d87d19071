"""Start-up never deletes images that a different or empty job store does not know (store ids)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage.database import Database
from storage.ingest import InstanceMeta, store_instance
from storage.instance_store import InstanceStore
from storage.store_identity import StoreMismatchError, check_and_bind, database_store_id, file_store_id

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def stored_pair(tmp_path: Path, name: str = "jobs") -> tuple[Database, InstanceStore]:
    db = Database(f"sqlite:///{tmp_path}/{name}.db")
    store = InstanceStore(tmp_path / "data")
    check_and_bind(db, store)
    for k in range(3):
        store_instance(db, store, InstanceMeta(f"1.2.3.4.{k}", MR, "1.2.3", "1.2.3.4", EXPLICIT_LE), b"image %d" % k)
    return db, store


def instance_files(store: InstanceStore) -> list[Path]:
    return sorted((store.root / "instances").rglob("*.dcm"))


def test_a_fresh_pair_gets_one_id_in_both_places(tmp_path: Path) -> None:
    db, store = stored_pair(tmp_path)
    assert file_store_id(store) == database_store_id(db) is not None
    assert check_and_bind(db, store) == file_store_id(store)  # stable


def test_an_empty_database_is_refused_while_the_store_holds_images(tmp_path: Path) -> None:
    _, store = stored_pair(tmp_path)
    before = instance_files(store)
    mistyped = Database(f"sqlite:///{tmp_path}/mistyped.db")
    with pytest.raises(StoreMismatchError, match="use an empty data directory; nothing was deleted"):
        check_and_bind(mistyped, store)
    assert instance_files(store) == before and len(before) == 3


def test_another_installations_database_is_refused(tmp_path: Path) -> None:
    _, store = stored_pair(tmp_path)
    other_db, _ = stored_pair(tmp_path / "other")
    with pytest.raises(StoreMismatchError, match="belongs to another data directory"):
        check_and_bind(other_db, store)


def test_a_new_data_directory_is_refused_for_a_database_with_instances(tmp_path: Path) -> None:
    db, _ = stored_pair(tmp_path)
    with pytest.raises(StoreMismatchError, match="not the one the job store"):
        check_and_bind(db, InstanceStore(tmp_path / "elsewhere"))


def test_serve_with_a_mistyped_database_url_refuses_and_deletes_nothing(tmp_path: Path) -> None:
    _, store = stored_pair(tmp_path)
    before = instance_files(store)
    env = {
        **os.environ,
        "DICOM_NODE__STORAGE__DATA_DIR": str(store.root),
        "DICOM_NODE__STORAGE__DATABASE_URL": f"sqlite:///{tmp_path}/typo.db",
        "DICOM_NODE__NODE__PORT": "0",
        "DICOM_NODE__WORKER__COUNT": "0",
    }
    run = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "nothing was deleted" in run.stderr and "Traceback" not in run.stderr
    assert instance_files(store) == before
