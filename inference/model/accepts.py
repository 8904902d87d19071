"""What a model package accepts as input: the manifest's `accepts` section, parsed and checked.

Why: a model is only trustworthy on the kind of series it was trained for. The
package says which kind that is, so the node can refuse everything else
*before* it loads pixels (`inference.imaging.screening`), with a reason a
physicist can read.

Decisions:

- Every key is optional; a missing key (or a package without the section, as
  packages written before it existed) gets the default below. The defaults
  describe what the MTSA-Net demo was built for and what the pipeline can run
  safely on a CPU node:
  - `modality` ["MR"]: the network was trained on MR only.
  - `contrast` "T1-CE": post-contrast T1 (see the screening module for how it is
    recognised from the header); "any" switches the contrast check off for a
    model trained on other contrasts.
  - `spacing_mm` [0.1, 10]: pixel spacing, slice spacing and SliceThickness.
    Below 0.1 mm no clinical MR exists (a value in cm or a typo); above 10 mm
    lesions of a few mm disappear between slices.
  - `slices` [8, 1024]: fewer than 8 is a localizer (no 3D lesion volumes); a
    1024-slice single-frame series is beyond any clinical head protocol.
  - `field_of_view_mm` [120, 500]: in-plane extent (Rows x row spacing, Columns
    x column spacing). An adult head needs about 180 mm; below 120 mm the brain
    is cut off, above 500 mm it is a body scan or wrong spacing.
  - `max_model_grid_voxels` 384 x 384 x 512 (75.5 M): the model grid is at most
    512 axial slices of the 384-pixel input (a 0.5 mm full-head sagittal needs
    about 400); float32 that is 288 MiB per copy.
  - `max_memory_mib` 4096: the estimated peak working memory of one job (see
    the screening module) on a node with 8 GiB or more.
  - `lossy_compressed` false: the demo was trained and evaluated on images never
    compressed lossily, so an image known to be (`inference.imaging.compression`)
    is refused; a package validated on lossy images may say true.
- Bounds are checked here, when the package loads, so a package with an empty
  or inverted range fails at start-up, not at the first job.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

CONTRASTS = ("T1-CE", "any")


@dataclass(frozen=True)
class ModelAccepts:
    """The kind of series a model may run on (defaults: see the module docstring)."""

    modality: tuple[str, ...] = ("MR",)
    contrast: str = "T1-CE"
    spacing_mm: tuple[float, float] = (0.1, 10.0)
    slices: tuple[int, int] = (8, 1024)
    field_of_view_mm: tuple[float, float] = (120.0, 500.0)
    max_model_grid_voxels: int = 384 * 384 * 512
    max_memory_mib: int = 4096
    lossy_compressed: bool = False

    def __post_init__(self) -> None:
        if not self.modality or not all(isinstance(m, str) and m for m in self.modality):
            raise ValueError(f"accepts.modality must be a non-empty list of modality codes, got {self.modality!r}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"accepts.contrast must be one of {', '.join(CONTRASTS)}, got {self.contrast!r}")
        for name in ("spacing_mm", "slices", "field_of_view_mm"):
            low, high = getattr(self, name)
            if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
                raise ValueError(f"accepts.{name} must be [low, high] with 0 < low <= high, got [{low}, {high}]")
        for name in ("max_model_grid_voxels", "max_memory_mib"):
            if getattr(self, name) <= 0:
                raise ValueError(f"accepts.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_manifest(cls, section: dict[str, Any] | None) -> ModelAccepts:
        """Parse the manifest's `accepts` (None: all defaults); raises ValueError naming the key."""
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise ValueError(f"accepts must be a JSON object, got {type(section).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"accepts: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        try:
            if "modality" in section:
                values["modality"] = tuple(str(m) for m in _as_list(section["modality"], "modality"))
            if "contrast" in section:
                values["contrast"] = str(section["contrast"])
            for name, kind in (("spacing_mm", float), ("slices", int), ("field_of_view_mm", float)):
                if name in section:
                    values[name] = _range(section[name], name, kind)
            for name in ("max_model_grid_voxels", "max_memory_mib"):
                if name in section:
                    values[name] = _integer(section[name], name)
            if "lossy_compressed" in section:
                if not isinstance(section["lossy_compressed"], bool):
                    raise ValueError(
                        f"accepts.lossy_compressed must be true or false, got {section['lossy_compressed']!r}"
                    )
                values["lossy_compressed"] = section["lossy_compressed"]
        except (TypeError, ValueError) as err:
            raise ValueError(str(err)) from None
        return cls(**values)

    def to_manifest(self) -> dict[str, Any]:
        """The JSON form written into a package's manifest."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, list):
        raise ValueError(f"accepts.{name} must be a list, got {value!r}")
    return value


def _range(value: Any, name: str, kind: type) -> tuple[Any, Any]:
    items = _as_list(value, name)
    if len(items) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        raise ValueError(f"accepts.{name} must be [low, high] numbers, got {value!r}")
    if kind is int and not all(float(v).is_integer() for v in items):
        raise ValueError(f"accepts.{name} must be whole numbers, got {value!r}")
    return kind(items[0]), kind(items[1])


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"accepts.{name} must be a whole number, got {value!r}")
    return int(value)
