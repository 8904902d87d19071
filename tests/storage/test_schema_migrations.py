"""Schema migrations (Alembic): a new database is current, an old one is refused until `db upgrade`.

The "previous release" database is made the way that release made it: the
revision-0001 tables with no `alembic_version` table, holding a job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text

from storage.database import Database, make_engine
from storage.models import Base
from storage.schema import SchemaError, _config, current_revision, head_revision


def previous_release_database(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as connection:
        command.upgrade(_config(connection), "0001")
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(
            text("INSERT INTO studies (study_uid, patient_id, created_at) VALUES ('1.2.3', 'OLD1', :now)"),
            {"now": "2026-11-01 10:00:00+00:00"},
        )
    engine.dispose()


def dicom_node(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOM_NODE__STORAGE__DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_a_new_database_gets_the_current_schema(job_store_url: str) -> None:
    db = Database(job_store_url)
    assert current_revision(db.engine) == head_revision()
    db.dispose()


@pytest.mark.slow
def test_a_previous_release_database_is_refused_then_upgraded_keeping_its_rows(job_store_url: str) -> None:
    previous_release_database(job_store_url)
    with pytest.raises(SchemaError, match="dicom-node db upgrade"):
        Database(job_store_url)

    refused = dicom_node("jobs", "list", url=job_store_url)
    assert refused.returncode == 2 and "db upgrade" in refused.stderr and "Traceback" not in refused.stderr
    stale = dicom_node("db", "current", url=job_store_url)
    assert stale.returncode == 1 and head_revision() in stale.stdout

    upgraded = dicom_node("db", "upgrade", url=job_store_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert dicom_node("db", "current", url=job_store_url).returncode == 0
    db = Database(job_store_url)
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT patient_id FROM studies")).scalar_one() == "OLD1"
        # the columns and tables of later revisions exist (leases, associations, Storage Commitment, store id)
        assert connection.execute(text("SELECT count(lease_expires_at) FROM jobs")).scalar_one() == 0
        assert connection.execute(text("SELECT count(*) FROM associations")).scalar_one() == 0
        assert connection.execute(text("SELECT count(transaction_uid) FROM exports")).scalar_one() == 0
        assert connection.execute(text("SELECT count(*) FROM node_meta")).scalar_one() == 0
    db.dispose()


def test_the_migrations_build_the_schema_the_models_declare(tmp_path: Path) -> None:
    """Upgrading from nothing through every revision gives the tables and columns of `create_all`."""
    migrated, created = (
        make_engine(f"sqlite:///{tmp_path}/migrated.db"),
        make_engine(f"sqlite:///{tmp_path}/created.db"),
    )
    with migrated.begin() as connection:
        command.upgrade(_config(connection), "head")
    Base.metadata.create_all(created)

    def shape(engine) -> dict[str, set[str]]:
        inspector = inspect(engine)
        names = [n for n in inspector.get_table_names() if n != "alembic_version"]
        return {n: {c["name"] for c in inspector.get_columns(n)} for n in names}

    assert shape(migrated) == shape(created)


@pytest.mark.slow
def test_upgrade_of_an_empty_database_creates_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    assert dicom_node("db", "upgrade", url=url).returncode == 0
    assert current_revision(make_engine(url)) == head_revision()


def test_an_association_of_more_than_2_gib_is_recorded_after_upgrading_from_0002(job_store_url: str) -> None:
    """Revision 0004 widens associations.bytes_received to 64 bits (PostgreSQL's INTEGER stops at 2**31 - 1)."""
    from storage.models import Association
    from storage.schema import upgrade

    engine = make_engine(job_store_url)
    with engine.begin() as connection:
        command.upgrade(_config(connection), "0002")
    assert upgrade(engine) == ("0002", head_revision())
    engine.dispose()
    db = Database(job_store_url)
    received = 5 * 2**30 + 7
    with db.session() as session:
        session.add(Association(calling_ae_title="BIGSENDER", outcome="released", bytes_received=received))
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT bytes_received FROM associations")).scalar_one() == received
    db.dispose()
