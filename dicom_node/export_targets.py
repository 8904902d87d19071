"""Which output object goes to which destination: the destinations' `objects` filters.

Applied where export rows are made (the worker, when a job's outputs are
written; `dicom-node jobs export`, when they are re-sent), so an object a
destination does not want never gets a row: it is neither sent nor failed,
and a TPS that takes only RT Structure Sets never holds a job in `failed`
for the SR it would refuse.
"""

from __future__ import annotations

from collections.abc import Iterable

from dicom_node.settings import Destination
from storage.models import OUTPUT_CLASS_NAMES


class ExportTargets:
    """The configured destinations' object filters, by destination name."""

    def __init__(self, destinations: Iterable[Destination]) -> None:
        self._destinations = {d.name: d for d in destinations}

    def wants(self, destination: str, sop_class_uid: str) -> bool:
        """Whether `destination` receives objects of `sop_class_uid`.

        An unconfigured name wants everything: its rows fail in the exporter
        with "not in the configuration", which is the reason an operator needs.
        """
        config = self._destinations.get(destination)
        return config is None or config.wants(OUTPUT_CLASS_NAMES.get(sop_class_uid, sop_class_uid))

    def rows(self, destinations: Iterable[str], outputs: list[tuple[str, str, str]]) -> list[tuple[str, str, str, str]]:
        """Export rows (destination, sop uid, class uid, path) for `outputs` (sop uid, class uid, path)."""
        return [(d, *output) for d in destinations for output in outputs if self.wants(d, output[1])]
