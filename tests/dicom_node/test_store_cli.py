"""Disaster recovery with `dicom-node store reindex`: the node's database deleted, its rows rebuilt, the series routed again."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from storage.models import Instance
from tests.dicom_node.conftest import cli, jobs_by_state, storescu, wait_for

pytestmark = pytest.mark.slow


def test_delete_the_database_then_reindex_and_route_again(start_node, node_env, mr_series) -> None:
    node = start_node()
    assert storescu(node.address[1], mr_series).returncode == 0
    (first,) = wait_for(lambda: jobs_by_state(node).get("queued"))
    data_dir = node.store.root
    node.stop()
    for database_file in data_dir.glob("dicom-node.db*"):
        database_file.unlink()

    refused = cli(node_env, "serve")
    assert refused.returncode == 2
    assert "dicom-node store reindex" in refused.stderr and "nothing was deleted" in refused.stderr
    assert len(list((data_dir / "instances").rglob("*.dcm"))) == len(mr_series)

    dry = cli(node_env, "store", "reindex", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would add {len(mr_series)} in 1 series" in dry.stdout
    done = cli(node_env, "store", "reindex")
    assert done.returncode == 0, done.stderr
    assert f"{len(mr_series)} instance files: 0 already known, added {len(mr_series)} in 1 series" in done.stdout
    assert "0 not indexed" in done.stdout and "store id" in done.stdout

    node = start_node()  # the same data directory: start-up accepts the rebuilt database
    with node.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == len(mr_series)
    (again,) = wait_for(lambda: jobs_by_state(node).get("queued"))  # routed by the example config's rule
    assert again.series_uid == first.series_uid and again.rule_name == first.rule_name
    assert len(list((data_dir / "instances").rglob("*.dcm"))) == len(mr_series)

    rerun = cli(node_env, "store", "reindex")
    assert rerun.returncode == 0 and f"{len(mr_series)} already known, added 0" in rerun.stdout
