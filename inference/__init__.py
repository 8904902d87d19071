"""The engine: a series folder in, lesions, EGFR and DICOM outputs back. No networking here.

Layout (what runs where):

- runtime, imported by every worker: `pipeline` (the chain, each stage timed),
  `imaging/` (load, pre- and post-processing), `model/` (network, packages,
  predictor, shipped demo package), `outputs/` (RTSTRUCT, SR, SEG writers),
  plus the hand-over types `result`, `errors`, `uids`;
- offline, never imported by the runtime: `training/`, `evaluation/`,
  `synthetic/` (phantoms, and other generators' styles applied to them).

This module is the seam `dicom_node` uses. Its names are resolved lazily
(PEP 562) so that `import inference.errors` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_SEAM = {
    "run_series": "inference.pipeline",
    "write_offline_outputs": "inference.pipeline",
    "write_dicom_outputs": "inference.outputs.dicom_outputs",
    "load_package": "inference.model.package",
    "default_package_path": "inference.model.package",
    "ModelPackage": "inference.model.package",
    "InferenceError": "inference.errors",
    "SeriesError": "inference.errors",
    "ModelPackageError": "inference.errors",
    "InferenceResult": "inference.result",
}

__all__ = sorted(_SEAM)


def __getattr__(name: str) -> Any:
    if name not in _SEAM:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    return getattr(importlib.import_module(_SEAM[name]), name)
