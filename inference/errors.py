"""Errors the engine raises on purpose, each carrying a reason a physicist can read."""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every deliberate engine failure; `str(err)` is the stored job reason."""


class SeriesError(InferenceError):
    """The input series cannot be used (missing slices, mixed orientations, ...)."""


class ModelPackageError(InferenceError):
    """A model package is missing, incomplete or corrupt (e.g. sha256 mismatch)."""


class SeriesRefused(SeriesError):
    """A readable series the model does not accept (contrast, modality, spacing, size): rejected, not failed."""
