"""From a GTV probability map to numbered lesions, and from slice predictions to the patient EGFR call.

Why: the RTSTRUCT (one ROI per lesion), the SR (volume and diameter per lesion)
and the EGFR call all derive from these two functions, so their conventions are
fixed here once.

Decisions:

- A voxel is tumour when its probability is strictly above the threshold.
- Only the brain is searched (`brain_mask`), by construction and twice over:
  a detection (3D component of the unmasked threshold map) whose voxels lie
  mostly outside the brain is dropped whole (a scalp rim or a field-of-view edge
  that touches the brain is not cut down to a "lesion" at the brain surface), and
  the probability is zero outside the brain before lesions are labelled, so no
  reported voxel lies outside it.
- Lesions are 3D connected components with 26-connectivity: a lesion that is
  diagonally connected between (thick or resampled oblique) slices stays one
  lesion rather than being split into ROIs a clinician would call one metastasis.
- Components below `min_volume_mm3` are dropped (isolated false-positive specks).
- Lesions are numbered GTV_1..GTV_n by voxel count, largest first; equal counts
  are ordered by their first voxel in array order (slice, row, column), so the
  numbering is deterministic. Label value i in the label map is GTV_i.
- Volume = voxel count x voxel volume (real spacing), in cm3.
- Maximum 3D diameter: a lesion is the union of its voxels (as for its volume),
  so the diameter is the largest distance between corners of its voxels, taken
  on the convex hull of the corners of its surface voxels, in patient mm. For a
  box of voxels it is exact; for a smooth lesion it is at most one voxel diagonal
  too large, never too small; one voxel gives its own diagonal.
- Centroid: mean of the voxel centres, LPS patient coordinates in mm.
- EGFR (SPEC.md, the paper's rule): slices with predicted tumour area > 0 are
  sorted by area (largest first, ties by slice index); the upper 50 % is kept,
  rounded up (ceil(n / 2): at least one slice, and the middle slice of an odd
  count is kept); the patient's mutant probability is the mean over those slices;
  > 0.5 is "mutant", otherwise "wild type". No tumour slice: "not assessable",
  probability None, never a guess.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import cdist, pdist

from inference.result import EgfrCall, EgfrPrediction, Lesion

_CORNERS = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])


def _index_to_physical(image: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """(m, 3) continuous (i, j, k) indices -> (m, 3) LPS mm."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (ijk * np.array(image.GetSpacing())) @ direction.T


def _farthest_pair_distance(points: np.ndarray, block: int = 2048) -> float:
    """Largest pairwise distance, in row blocks so that large hulls stay within memory."""
    if len(points) <= block:
        return float(pdist(points).max()) if len(points) > 1 else 0.0
    return max(float(cdist(points[i : i + block], points).max()) for i in range(0, len(points), block))


def _row_extremes(component: np.ndarray) -> np.ndarray:
    """(i, j, k) of the first and last voxel of every non-empty row: their hull is the component's hull."""
    filled = component.any(axis=2)
    first = np.argmax(component, axis=2)
    last = component.shape[2] - 1 - np.argmax(component[:, :, ::-1], axis=2)
    k, j = np.nonzero(filled)
    return np.concatenate([np.stack([first[k, j], j, k], axis=1), np.stack([last[k, j], j, k], axis=1)])


def max_diameter_mm(component: np.ndarray, offset: np.ndarray, image: sitk.Image) -> float:
    """Largest corner-to-corner distance of a boolean (k, j, i) component; `offset` is its (i, j, k) origin.

    The hull of all voxel corners is the hull of the voxel-centre hull's vertices,
    each widened by its 8 corners; the centre hull only needs each row's two end voxels.
    """
    centres = _row_extremes(component) + offset
    try:
        centres = centres[ConvexHull(centres).vertices]
    except QhullError:  # flat or thin lesion (one slice, one row): all its row ends
        pass
    corners = (centres[:, None, :] + _CORNERS[None, :, :]).reshape(-1, 3)
    points = _index_to_physical(image, corners)
    return _farthest_pair_distance(points[ConvexHull(points).vertices])


def _centroid_index(component: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Mean (i, j, k) of the component's voxel centres, without listing the voxels."""
    count = component.sum()
    means = [
        (component.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(component.shape[axis])).sum() / count
        for axis in range(3)
    ]
    return np.array(means[::-1]) + offset


def _inside_brain(binary: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """`binary` inside `brain`, keeping only detections with the majority of their voxels inside."""
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(binary.view(np.uint8)), True))
    total = np.bincount(components.ravel())
    inside = np.bincount(components[brain], minlength=total.size)
    mostly_inside = 2 * inside > total
    mostly_inside[0] = False
    return mostly_inside[components] & brain


def extract_lesions(
    probability: sitk.Image,
    *,
    brain_mask: sitk.Image,
    threshold: float,
    min_volume_mm3: float,
) -> tuple[sitk.Image, list[Lesion]]:
    """uint16 label map (GTV_i has value i) on `probability`'s grid, and the lesions by size.

    `brain_mask` (same grid) is where lesions may be: nothing outside it is reported.
    """
    if brain_mask.GetSize() != probability.GetSize():
        raise ValueError(f"extract_lesions: brain mask size {brain_mask.GetSize()} != {probability.GetSize()}")
    brain = sitk.GetArrayViewFromImage(brain_mask) > 0
    binary = _inside_brain(sitk.GetArrayViewFromImage(probability) > threshold, brain)
    tumour = sitk.GetImageFromArray(binary.view(np.uint8))
    tumour.CopyInformation(probability)
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(tumour, True))
    voxel_mm3 = float(np.prod(probability.GetSpacing()))
    counts = np.bincount(components.ravel())
    boxes = ndimage.find_objects(components)
    candidates = []
    for value, box in enumerate(boxes, start=1):
        if box is None or counts[value] * voxel_mm3 < min_volume_mm3:
            continue
        local = np.unravel_index(np.argmax(components[box] == value), components[box].shape)
        first = np.ravel_multi_index([b.start + i for b, i in zip(box, local)], components.shape)
        candidates.append((-int(counts[value]), first, value, box))
    candidates.sort()
    label_map = np.zeros(components.shape, np.uint16)
    lesions = []
    for rank, (_, _, value, box) in enumerate(candidates, start=1):
        component = components[box] == value
        label_map[box][component] = rank
        offset = np.array([b.start for b in box][::-1])
        centroid = _index_to_physical(probability, _centroid_index(component, offset)[None, :])[0]
        count = int(component.sum())
        lesions.append(
            Lesion(
                label=rank,
                name=f"GTV_{rank}",
                voxel_count=count,
                volume_cm3=count * voxel_mm3 / 1000.0,
                max_diameter_mm=max_diameter_mm(component, offset, probability),
                centroid_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
            )
        )
    out = sitk.GetImageFromArray(label_map)
    out.CopyInformation(probability)
    return out, lesions


def aggregate_egfr(slice_tumour_area: np.ndarray, slice_mutant_prob: np.ndarray) -> EgfrPrediction:
    """Patient-level EGFR from per-slice tumour areas and mutant probabilities (the paper's rule)."""
    area = np.asarray(slice_tumour_area, dtype=float)
    prob = np.asarray(slice_mutant_prob, dtype=float)
    if area.ndim != 1 or area.shape != prob.shape:
        raise ValueError(f"aggregate_egfr: need two equal 1-D arrays, got {area.shape} and {prob.shape}")
    tumour = np.flatnonzero(area > 0)
    if tumour.size == 0:
        return EgfrPrediction(EgfrCall.NOT_ASSESSABLE, None, 0)
    order = tumour[np.lexsort((tumour, -area[tumour]))]
    kept = order[: math.ceil(tumour.size / 2)]
    mutant = float(prob[kept].mean())
    call = EgfrCall.MUTANT if mutant > 0.5 else EgfrCall.WILD_TYPE
    return EgfrPrediction(call, mutant, int(kept.size))
