"""Disaster recovery with `dicom-node store reindex --route`: the node's database deleted, its rows rebuilt, the series
routed again (without --route they are marked evaluated: tests/storage/test_reindex.py)."""

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
    running = cli(node_env, "store", "reindex")  # refused beside a running node: its slot is locked
    assert running.returncode == 2 and "a node or worker is running on this data directory" in running.stderr
    assert "stop it first" in running.stderr
    node.stop()
    for database_file in data_dir.glob("dicom-node.db*"):
        database_file.unlink()

    refused = cli(node_env, "serve")
    assert refused.returncode == 2
    assert "dicom-node store reindex" in refused.stderr and "nothing was deleted" in refused.stderr
    assert len(list((data_dir / "instances").rglob("*.dcm"))) == len(mr_series)

    dry = cli(node_env, "store", "reindex", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would add {len(mr_series)} in 1 series (would mark evaluated: not processed or delivered again" in (
        dry.stdout
    )
    done = cli(node_env, "store", "reindex", "--route")  # the default would mark the series evaluated
    assert done.returncode == 0, done.stderr
    assert f"{len(mr_series)} instance files: 0 already known, added {len(mr_series)} in 1 series" in done.stdout
    assert "each gets a job and is routed again" in done.stdout
    assert "0 not indexed, 0 rows without a file marked purged" in done.stdout and "store id" in done.stdout

    # the same data directory: start-up accepts the rebuilt database. Series last fed before the start
    # wait the long quiet period (their association is unknown), here made short.
    node = start_node(DICOM_NODE__SERIES__PARTIAL_QUIET_PERIOD_S="3")
    with node.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == len(mr_series)
    (again,) = wait_for(lambda: jobs_by_state(node).get("queued"))  # routed by the example config's rule
    assert again.series_uid == first.series_uid and again.rule_name == first.rule_name
    assert len(list((data_dir / "instances").rglob("*.dcm"))) == len(mr_series)

    node.stop()
    rerun = cli(node_env, "store", "reindex")
    assert rerun.returncode == 0 and f"{len(mr_series)} already known, added 0" in rerun.stdout
