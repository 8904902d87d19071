"""Which data directory a job store belongs to, so that a wrong database can never empty the image store.

At start-up the node removes instance files without a row (written, then the
process died before the commit: never acknowledged). Against the *wrong*
database (a new or mistyped `database_url`, a restored old backup) that rule
would delete every received image. So the data directory and the job store
each carry the same random store id (`<data_dir>/store-id` and the
`node_meta` row `store_id`), and start-up refuses, deleting nothing, when:

- the ids differ (this database belongs to another data directory);
- the database has no id while the data directory holds instances (a new or
  empty database: point the node at the right one, restore it, or, when it is
  lost, rebuild its rows from the files with `dicom-node store reindex`,
  `storage.reindex`, which then records the id);
- the data directory has no id while the database knows instances that are
  not purged (a new or wrong data directory).

A fresh pair (no ids, no instances) is simply given a new id.
"""

from __future__ import annotations

import os
import uuid

from sqlalchemy import func, select

from storage.database import Database
from storage.instance_store import InstanceStore
from storage.models import Instance, NodeMeta

STORE_ID_FILE = "store-id"
STORE_ID_KEY = "store_id"


class StoreMismatchError(Exception):
    """The job store and the data directory do not belong together; the message says what to do."""


def file_store_id(store: InstanceStore) -> str | None:
    path = store.root / STORE_ID_FILE
    return path.read_text().strip() or None if path.exists() else None


def database_store_id(db: Database) -> str | None:
    with db.session() as session:
        row = session.get(NodeMeta, STORE_ID_KEY)
        return row.value if row is not None else None


def bind(db: Database, store: InstanceStore, store_id: str) -> None:
    """Record `store_id` in both places (the file durably, before the row)."""
    path = store.root / STORE_ID_FILE
    if not path.exists():
        partial = path.with_suffix(".partial")
        partial.write_text(store_id + "\n")
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    with db.session() as session:
        row = session.get(NodeMeta, STORE_ID_KEY)
        if row is None:
            session.add(NodeMeta(key=STORE_ID_KEY, value=store_id))
        else:
            row.value = store_id


def check_and_bind(db: Database, store: InstanceStore) -> str:
    """Verify the pair belongs together (see module doc); returns the store id. Deletes nothing."""
    on_disk, in_db = file_store_id(store), database_store_id(db)
    if on_disk and in_db and on_disk != in_db:
        raise StoreMismatchError(
            f"the job store ({db.url_for_humans}) belongs to another data directory (store id {in_db}, "
            f"{store.root} has {on_disk}): check storage.database_url and storage.data_dir; nothing was deleted"
        )
    if in_db is None and _has_instance_files(store):
        raise StoreMismatchError(
            f"the job store ({db.url_for_humans}) does not know the data directory {store.root}, which holds "
            f"received images: a new or mistyped storage.database_url? Point the node at the database it was used "
            f"with (or restore it from a backup, see docs/INSTALL.md); if it is lost, rebuild its rows from the "
            f"files with `dicom-node store reindex` (the job history is not recovered); or use an empty data "
            f"directory; nothing was deleted"
        )
    if on_disk is None and _known_instances(db):
        raise StoreMismatchError(
            f"the data directory {store.root} is not the one the job store ({db.url_for_humans}) was used with "
            f"({_known_instances(db)} instances are recorded there): check storage.data_dir; nothing was deleted"
        )
    store_id = on_disk or in_db or uuid.uuid4().hex
    bind(db, store, store_id)
    return store_id


def _has_instance_files(store: InstanceStore) -> bool:
    return next((store.root / "instances").rglob("*.dcm"), None) is not None


def _known_instances(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count(Instance.id)).where(Instance.purged_at.is_(None))) or 0)
