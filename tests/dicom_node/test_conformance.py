"""docs/CONFORMANCE.md against the node: the generated tables are current, and a real association
that proposes every listed context (and some unlisted ones) gets exactly the listed ones accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE, build_role
from pynetdicom.sop_class import ModalityWorklistInformationFind, StorageCommitmentPushModel
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.conformance import BEGIN, END, documented_contexts, documented_groups, rewrite
from dicom_node.settings import NodeSettings
from dicom_node.store_scp import StoreSCP
from storage.database import Database
from storage.instance_store import InstanceStore

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "CONFORMANCE.md"
SCP_SIDE = "Accepted as SCP (Store SCP AE)"
PRIVATE_CLASS = "1.2.826.0.1.3680043.10.1017.1"  # no node knows it
PRIVATE_SYNTAX = "1.2.826.0.1.3680043.10.1017.2"
MAX_CONTEXTS = 127  # odd presentation context IDs 1..253 leave room for one more; keep it simple


def negotiate(port: int, proposals: list[tuple[str, str]], roles: list | None = None) -> set[tuple[str, str]]:
    """Propose each (SOP class, transfer syntax) as its own context, in batches; return those accepted."""
    accepted: set[tuple[str, str]] = set()
    for start in range(0, len(proposals), MAX_CONTEXTS):
        ae = AE(ae_title="CONFCHECK")
        for sop_class, syntax in proposals[start : start + MAX_CONTEXTS]:
            ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", ext_neg=roles or [])
        if assoc.is_established:
            accepted |= {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            assoc.release()
    return accepted


def test_the_document_is_generated_from_the_current_code() -> None:
    text = DOCUMENT.read_text(encoding="utf-8")
    assert BEGIN in text and END in text
    assert rewrite(text, NodeSettings()) == text, "docs/CONFORMANCE.md is stale: run `dicom-node conformance`"


@pytest.mark.slow  # 15-25 s: some 2700 contexts, one per (SOP class, transfer syntax)
def test_the_node_accepts_exactly_the_contexts_the_document_lists(tmp_path: Path) -> None:
    listed = documented_contexts(DOCUMENT.read_text(encoding="utf-8"), SCP_SIDE)
    storage = sorted(pair for pair in listed if pair[0] != StorageCommitmentPushModel)
    commitment = sorted(pair for pair in listed if pair[0] == StorageCommitmentPushModel)
    assert storage and commitment
    syntaxes = sorted({ts for _, ts in listed})
    classes = sorted({cls for cls, _ in storage})
    unlisted = (
        [(PRIVATE_CLASS, ts) for ts in syntaxes[:3]]
        + [(cls, PRIVATE_SYNTAX) for cls in classes[:3]]
        + [(str(ModalityWorklistInformationFind), ts) for ts in syntaxes[:2]]
    )
    assert not set(unlisted) & listed
    scp = StoreSCP(NodeSettings(port=0), Database(f"sqlite:///{tmp_path}/jobs.db"), InstanceStore(tmp_path / "data"))
    _, port = scp.start()
    try:
        accepted = negotiate(port, storage + unlisted)
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        accepted |= negotiate(port, commitment, roles=[role])
    finally:
        scp.stop()
    assert accepted == listed, (
        f"accepted but not documented: {sorted(accepted - listed)}; documented but refused: {sorted(listed - accepted)}"
    )


def test_of_several_proposed_transfer_syntaxes_the_node_accepts_its_first_preference(tmp_path: Path) -> None:
    """Each SOP class proposed once with all its documented transfer syntaxes in reverse order:
    the accepted one is the first of the document's list, not the requestor's first."""
    groups = documented_groups(DOCUMENT.read_text(encoding="utf-8"), SCP_SIDE)
    scp = StoreSCP(NodeSettings(port=0), Database(f"sqlite:///{tmp_path}/jobs.db"), InstanceStore(tmp_path / "data"))
    _, port = scp.start()
    try:
        for syntaxes, classes in groups:
            for start in range(0, len(classes), MAX_CONTEXTS):
                ae = AE(ae_title="CONFCHECK")
                for sop_class in classes[start : start + MAX_CONTEXTS]:
                    ae.add_requested_context(sop_class, list(reversed(syntaxes)))
                roles = [
                    build_role(c, scu_role=False, scp_role=True) for c in classes if c == StorageCommitmentPushModel
                ]
                assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", ext_neg=roles)
                assert assoc.is_established
                chosen = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
                assoc.release()
                assert chosen == {syntaxes[0]}, (classes[start], chosen)
    finally:
        scp.stop()


def test_conformance_command_rewrites_a_stale_document_and_check_fails_on_it(tmp_path: Path) -> None:
    stale = tmp_path / "CONFORMANCE.md"
    stale.write_text(f"# Statement\n\n{BEGIN}\n| Old | `1.2.3` | SCP |\n{END}\n", encoding="utf-8")
    runner = CliRunner()
    checked = runner.invoke(app, ["conformance", "--doc", str(stale), "--check"])
    assert checked.exit_code == 1 and "out of date" in checked.output
    assert runner.invoke(app, ["conformance", "--doc", str(stale)]).exit_code == 0
    assert "RT Structure Set Storage" in stale.read_text() and "`1.2.3`" not in stale.read_text()
    assert runner.invoke(app, ["conformance", "--doc", str(stale), "--check"]).exit_code == 0
    missing = runner.invoke(app, ["conformance", "--doc", str(tmp_path / "none.md")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
