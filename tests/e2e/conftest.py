"""End-to-end tests reuse the node fixtures (a running NodeService on loopback)."""

from tests.dicom_node.conftest import node_env, start_node  # noqa: F401  (pytest fixtures)
