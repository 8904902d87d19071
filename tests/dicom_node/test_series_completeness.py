"""The completeness verdict from headers: counts, temporal and cardiac positions, slice-position gaps."""

from __future__ import annotations

from pathlib import Path

import pydicom

from dicom_node.series_completeness import SliceHeader, assess, read_slice_header

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def axial(n: int, *, spacing: float = 2.0, start: int = 1, **fields) -> list[SliceHeader]:
    """Slices `start`..`start + n - 1`, InstanceNumber = slice number, z = (number - 1) * spacing."""
    return [
        SliceHeader(instance_number=k, position=(-100.0, -120.0, (k - 1) * spacing), orientation=AXIAL, **fields)
        for k in range(start, start + n)
    ]


def test_fewer_images_than_images_in_acquisition_is_incomplete_with_the_missing_numbers():
    verdict = assess(axial(150, images_in_acquisition=176))
    assert verdict.incomplete and not verdict.confirmed and verdict.expected == 176
    assert verdict.missing == "150 of 176 images (ImagesInAcquisition 176), InstanceNumber 151-176 missing"


def test_as_many_images_as_images_in_acquisition_is_confirmed_complete():
    verdict = assess(axial(176, images_in_acquisition=176))
    assert verdict.confirmed and not verdict.incomplete
    assert "176 of 176 images (ImagesInAcquisition)" in verdict.describe()


def test_a_count_that_does_not_describe_the_series_is_ignored_never_holds_it_back():
    # More images than the count (e.g. the count is per temporal position).
    assert not assess(axial(24, images_in_acquisition=12)).incomplete
    # Numbering beyond the count (a console numbering across series).
    numbered = [SliceHeader(instance_number=100 + k, images_in_acquisition=20) for k in range(10)]
    assert assess(numbered).expected is None
    # Values that disagree, or absent on some instances.
    mixed = axial(5, images_in_acquisition=20) + axial(5, start=6, images_in_acquisition=21)
    assert assess(mixed).expected is None and not assess(mixed).incomplete
    partly = axial(5, images_in_acquisition=20) + axial(5, start=6)
    assert assess(partly).expected is None
    # Two acquisitions in one series: the count is per acquisition.
    two = axial(5, images_in_acquisition=20, acquisition_number=1) + axial(
        5, start=6, images_in_acquisition=20, acquisition_number=2
    )
    assert assess(two).expected is None


def test_counts_of_derived_images_are_not_used():
    # A reformat may carry its source acquisition's count: it never holds the series back.
    verdict = assess(axial(60, images_in_acquisition=176, derived=True))
    assert verdict.expected is None and not verdict.incomplete and not verdict.confirmed
    located = assess(axial(60, vendor_locations=("GE LocationsInAcquisition", 176), derived=True))
    assert not located.incomplete and not located.confirmed


def test_a_vendor_count_of_slice_locations_is_used_without_images_in_acquisition():
    ge = ("GE LocationsInAcquisition", 40)
    verdict = assess(axial(30, vendor_locations=ge))
    assert verdict.missing == "30 of 40 slice locations (GE LocationsInAcquisition 40)"
    assert assess(axial(40, vendor_locations=ge)).confirmed
    # Repeated per temporal position, locations are counted once.
    two_times = axial(40, vendor_locations=ge, temporal_positions=2, temporal_position=1) + axial(
        40, vendor_locations=ge, temporal_positions=2, temporal_position=2
    )
    assert assess(two_times).confirmed
    # More locations than the count: it does not describe this series.
    assert not assess(axial(50, vendor_locations=ge)).incomplete
    # ImagesInAcquisition, when it applies, comes first.
    both = assess(axial(40, images_in_acquisition=40, vendor_locations=("GE LocationsInAcquisition", 90)))
    assert both.confirmed and "ImagesInAcquisition" in both.evidence


def test_a_gap_in_the_slice_positions_is_incomplete_even_without_a_count():
    slices = [h for h in axial(40) if not 21 <= h.instance_number <= 25]  # type: ignore[operator]
    verdict = assess(slices)
    assert verdict.incomplete and verdict.expected is None
    assert verdict.missing == "about 5 slices missing between slice positions 38 to 50 mm (spacing 2 mm)"


def test_evenly_spaced_positions_without_a_count_look_whole_trailing_slices_cannot_be_seen():
    # 150 of 176 slices, the last 26 never sent: nothing in the headers says so (documented limit).
    verdict = assess(axial(150))
    assert not verdict.incomplete and not verdict.confirmed
    assert verdict.describe() == "150 instances: 150 slice positions, spacing 2 mm, no gap"


def test_oblique_positions_are_projected_on_the_slice_normal():
    # Rows along x, columns along y*cos + z*sin: the normal is tilted 30 degrees; slices step 3 mm along it.
    c, s = 3**0.5 / 2, 0.5
    orientation = (1.0, 0.0, 0.0, 0.0, c, s)
    normal = (0.0, -s, c)
    headers = [
        SliceHeader(instance_number=k, position=(0.0, k * 3 * normal[1], k * 3 * normal[2]), orientation=orientation)
        for k in range(20)
        if k != 10
    ]
    verdict = assess(headers)
    assert verdict.missing is not None and verdict.missing.startswith("about 1 slices missing")
    assert "spacing 3 mm" in verdict.missing


def test_mixed_orientations_give_no_position_verdict():
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    headers = axial(10) + [SliceHeader(instance_number=11, position=(0.0, 0.0, 500.0), orientation=sagittal)]
    assert not assess(headers).incomplete


def test_missing_temporal_positions_and_a_short_last_position():
    slices = []
    for t in (1, 2, 3):  # of 4
        slices += axial(10, temporal_positions=4, temporal_position=t)
    slices += axial(6, temporal_positions=4, temporal_position=4)  # all four, the last one short
    assert assess(slices).missing == "temporal position 4: 6 of 10 slices"
    three = [h for h in slices if h.temporal_position != 4]
    assert assess(three).missing == "temporal position 4 of 4 missing (NumberOfTemporalPositions)"
    whole = three + axial(10, temporal_positions=4, temporal_position=4)
    assert not assess(whole).incomplete


def test_slice_locations_with_fewer_cardiac_phases_than_cardiac_number_of_images():
    slices = []
    for k in range(1, 6):
        phases = 3 if k == 5 else 8
        slices += [
            SliceHeader(instance_number=k * 10 + p, position=(0.0, 0.0, 5.0 * k), orientation=AXIAL, cardiac_images=8)
            for p in range(phases)
        ]
    verdict = assess(slices)
    assert verdict.missing == "1 slice locations with fewer than 8 images (CardiacNumberOfImages; 25 mm: 3)"


def test_read_slice_header_reads_the_stored_attributes(mr_series: list[Path], tmp_path: Path):
    ds = pydicom.dcmread(mr_series[2])
    ds.ImagesInAcquisition = 12
    ds.ImagePositionPatient = ["1", "2"]  # unusable (two values): no position rather than an error
    copy = tmp_path / "copy.dcm"
    ds.save_as(copy)
    header = read_slice_header(copy)
    assert header.instance_number == 3 and header.images_in_acquisition == 12
    assert header.position is None and header.orientation is not None
    assert header.derived  # the phantoms are DERIVED\SECONDARY
    first = read_slice_header(mr_series[0])
    assert first.position is not None and first.vendor_locations is None


def test_read_slice_header_reads_vendor_counts_only_under_their_private_creator(mr_series: list[Path], tmp_path):
    def saved(name: str, group: int, creator: str, offset: int, vr: str, value) -> Path:
        ds = pydicom.dcmread(mr_series[0])
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.private_block(group, "SOMEONE ELSE", create=True)  # takes block 0x10: the vendor's lands in 0x11
        ds.private_block(group, creator, create=True).add_new(offset, vr, value)
        ds.save_as(tmp_path / name)
        return tmp_path / name

    ge = read_slice_header(saved("ge.dcm", 0x0021, "GEMS_RELA_01", 0x4F, "SS", 176))
    assert ge.vendor_locations == ("GE LocationsInAcquisition", 176) and not ge.derived
    philips = read_slice_header(saved("philips.dcm", 0x2001, "Philips Imaging DD 001", 0x18, "SL", 60))
    assert philips.vendor_locations == ("Philips NumberOfSlicesMR", 60)
    other = read_slice_header(saved("other.dcm", 0x0021, "NOT GE", 0x4F, "SS", 176))
    assert other.vendor_locations is None


def test_two_matrices_under_one_series_uid_are_left_to_the_engine():
    """Interleaved positions of two acquisitions look like gaps; the engine fails such a series
    naming the mixed matrices, so completeness gives no gap verdict (and no long wait)."""
    normal = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    first = [SliceHeader(position=(0.0, 0.0, 4.0 * k), orientation=normal, matrix=(64, 64)) for k in range(6)]
    second = [SliceHeader(position=(0.0, 0.0, 1.0 + 9.0 * k), orientation=normal, matrix=(96, 96)) for k in range(6)]
    verdict = assess(first + second)
    assert not verdict.incomplete, verdict.missing
    assert assess(first[:2] + first[4:]).incomplete  # one matrix: the same gap is seen
