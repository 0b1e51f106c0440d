"""Geometry: slices are ordered by position whatever the file names, and masks align voxel for voxel.

Every case writes a small CT series (6 slices of 20 rows x 16 columns, non-square pixels) whose
pixel values are all different, under random file names (some without ``.dcm``, some in nested
folders), in random order, with a misleading InstanceNumber. The series is written in axial,
sagittal, coronal and oblique orientations, with the slice step along the slice normal
``cross(row_dir, col_dir)`` or against it (flipped). NIfTI masks are written the way converters
do (column, row, slice on disk; LPS affine turned into RAS+) and then reordered on disk; DICOM
SEG objects are written with highdicom from the series' own datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fedscan.common.data.dicom import SeriesHeader, read_series, scan_site
from fedscan.common.data.labels import index_masks, load_mask, load_seg
from fedscan.common.errors import FedscanError

N_SLICES, ROWS, COLS = 6, 20, 16
PIXEL_SPACING = (0.8, 0.6)  # DICOM order: between rows, between columns (mm)
SLICE_STEP_MM = 2.5
INTERCEPT = -1024.0
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(deg_x: float, deg_z: float) -> np.ndarray:
    ax, az = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ rz


_OBLIQUE = _rotation(20.0, 20.0)
# (row_dir, col_dir): row_dir is the direction of increasing column index, col_dir of increasing row index
ORIENTATIONS = {
    "axial": ((1, 0, 0), (0, 1, 0)),  # normal +z (towards the head)
    "sagittal": ((0, 1, 0), (0, 0, -1)),  # normal -x (towards the patient's right)
    "coronal": ((1, 0, 0), (0, 0, -1)),  # normal +y (towards the back)
    "oblique": (tuple(_OBLIQUE[:, 0]), tuple(_OBLIQUE[:, 1])),  # axial tilted 20 degrees twice
}
CASES = [
    pytest.param((name, sign), id=f"{name}-{'flipped' if sign < 0 else 'along-normal'}")
    for name in ORIENTATIONS
    for sign in (1, -1)
]


@dataclass
class Geometry:
    """Where voxel (k, r, c) of a volume is: origin + k * step + c * dc * row_dir + r * dr * col_dir."""

    row_dir: np.ndarray
    col_dir: np.ndarray
    step: np.ndarray  # from one written slice to the next (may point against the normal)
    origin: np.ndarray
    spacing: tuple[float, float] = PIXEL_SPACING

    @classmethod
    def make(cls, orientation: str, sign: int) -> Geometry:
        row, col = ORIENTATIONS[orientation]
        # the values as they will read back from the files (IOP is written with 6 decimals)
        row_dir, col_dir = np.round(np.asarray(row, float), 6), np.round(np.asarray(col, float), 6)
        normal = np.cross(row_dir, col_dir)
        step = sign * SLICE_STEP_MM * normal / np.linalg.norm(normal)
        return cls(row_dir, col_dir, step, np.array([-40.25, 12.5, 100.75]))

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def ascending(self) -> bool:
        """Whether the written slice order is the ascending order along the normal."""
        return float(self.step @ self.normal) > 0

    def position(self, k: int) -> np.ndarray:
        return np.round(self.origin + k * self.step, 4)

    def lps_affine(self) -> np.ndarray:
        """Voxel (i = column, j = row, k = written slice) to LPS mm, as converters build it."""
        dr, dc = self.spacing
        aff = np.eye(4)
        aff[:3, 0] = self.row_dir * dc  # the column index moves along row_dir
        aff[:3, 1] = self.col_dir * dr  # the row index moves along col_dir
        aff[:3, 2] = self.step
        aff[:3, 3] = self.origin
        return aff


def _volume() -> np.ndarray:
    """vol[k, r, c]: every voxel a different value, so any flip, shift or transposition shows."""
    return (np.arange(N_SLICES * ROWS * COLS, dtype=np.uint16) + 7).reshape(N_SLICES, ROWS, COLS)


def _labels(seed: int = 5) -> np.ndarray:
    """A label map in written slice order: random 0/1/2 per voxel, one slice left empty."""
    labels = np.random.default_rng(seed).integers(0, 3, size=(N_SLICES, ROWS, COLS)).astype(np.uint8)
    labels[2] = 0  # an empty slice: highdicom omits its frame from the SEG
    return labels


def _ds(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".") if x != 0 else "0"


def _slice_dataset(geo: Geometry, k: int, pixels: np.ndarray, uids: dict[str, str], instance: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PatientID = "GEO-1"
    ds.PatientName = "Geometry^Test"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = "test"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [_ds(v) for v in (*geo.row_dir, *geo.col_dir)]
    ds.ImagePositionPatient = [_ds(v) for v in geo.position(k)]
    ds.PixelSpacing = [_ds(v) for v in geo.spacing]
    ds.SliceThickness = _ds(SLICE_STEP_MM)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = _ds(INTERCEPT)
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


@dataclass
class Written:
    geo: Geometry
    vol: np.ndarray  # vol[k] is written slice k, at geo.position(k)
    datasets: list[Dataset]  # in the order the files were written (shuffled)
    sops: list[str]  # SOPInstanceUID of written slice k
    series_uid: str


def write_series(images: Path, geo: Geometry, vol: np.ndarray, seed: int) -> Written:
    """One file per slice, written in random order under random names and folders."""
    rng = np.random.default_rng(seed)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    n = len(vol)
    # misleading InstanceNumbers: neither their order nor its reverse is the geometric order
    instance = rng.permutation(n) + 1
    while np.all(np.diff(instance) > 0) or np.all(np.diff(instance) < 0):
        instance = rng.permutation(n) + 1
    datasets: dict[int, Dataset] = {
        k: _slice_dataset(geo, k, vol[k], uids, int(instance[k])) for k in range(n)
    }
    folders = ["", "a", "a/b", "zz/1/2"]
    order = rng.permutation(n)
    names = {}
    for i, k in enumerate(order):
        name = f"{rng.integers(16**8):08x}" + (".dcm" if i % 3 == 0 else "")
        path = images / folders[i % len(folders)] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets[int(k)].save_as(path, enforce_file_format=True)
        names[int(k)] = path
    by_name = sorted(range(n), key=lambda k: str(names[k]))
    assert by_name not in (list(range(n)), list(range(n))[::-1]) or n < 3, "file names happen to be in order"
    return Written(
        geo,
        vol,
        [datasets[int(k)] for k in order],
        [str(datasets[k].SOPInstanceUID) for k in range(n)],
        uids["series"],
    )


def _in_header_order(geo: Geometry, arr: np.ndarray) -> np.ndarray:
    """An array in written slice order, put in the ascending order along the normal."""
    return arr if geo.ascending else arr[::-1]


def _one_series(images: Path) -> SeriesHeader:
    scan = scan_site(images)
    assert not scan.skipped, [(s.path.name, s.reason) for s in scan.skipped]
    assert len(scan.series) == 1
    return scan.series[0]


@pytest.fixture(params=CASES)
def written(request: pytest.FixtureRequest, tmp_path: Path) -> Written:
    orientation, sign = request.param
    geo = Geometry.make(orientation, sign)
    return write_series(tmp_path / "images", geo, _volume(), seed=sum(map(ord, orientation)) + sign)


# --- slice order -------------------------------------------------------------------------------


def test_shuffled_series_reloads_in_geometric_order(written: Written, tmp_path: Path) -> None:
    geo = written.geo
    header = _one_series(tmp_path / "images")
    assert header.series_uid == written.series_uid
    assert header.geometry and not header.warnings
    assert len(header) == N_SLICES
    assert header.shape == (ROWS, COLS)
    assert header.spacing == pytest.approx(PIXEL_SPACING)
    np.testing.assert_allclose(header.row_dir, geo.row_dir)
    np.testing.assert_allclose(header.col_dir, geo.col_dir)
    assert header.slice_spacing == pytest.approx(SLICE_STEP_MM, abs=1e-3)

    # positions: those written, strictly ascending along the normal, one step apart
    expected_pos = _in_header_order(geo, np.stack([geo.position(k) for k in range(N_SLICES)]))
    np.testing.assert_allclose(header.positions, expected_pos, atol=1e-6)
    along = header.positions @ (geo.normal / np.linalg.norm(geo.normal))
    np.testing.assert_allclose(np.diff(along), SLICE_STEP_MM, atol=1e-3)
    assert header.sop_uids == list(_in_header_order(geo, np.array(written.sops)))

    # neither InstanceNumber nor the file names give that order
    numbers = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in header.files]
    assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)
    assert [str(f) for f in header.files] != sorted(map(str, header.files))
    assert {f.suffix for f in header.files} == {".dcm", ""}
    assert len({f.parent for f in header.files}) > 1

    pixels, ok, failed = read_series(header)
    assert ok.all() and not failed
    assert pixels.dtype == np.float32 and pixels.shape == (N_SLICES, ROWS, COLS)
    np.testing.assert_array_equal(pixels, _in_header_order(geo, written.vol).astype(np.float32) + INTERCEPT)


def test_flipped_series_holds_the_same_voxels_in_the_same_places(tmp_path: Path) -> None:
    """The same anatomy sliced in either direction reads back as the same array."""
    vol = _volume()
    up, down = Geometry.make("axial", 1), Geometry.make("axial", -1)
    down.origin = up.position(N_SLICES - 1)  # the flipped series starts where the other one ends
    write_series(tmp_path / "up", up, vol, seed=1)
    write_series(tmp_path / "down", down, vol[::-1], seed=2)
    a, b = _one_series(tmp_path / "up"), _one_series(tmp_path / "down")
    np.testing.assert_allclose(a.positions, b.positions, atol=1e-6)
    np.testing.assert_array_equal(read_series(a)[0], read_series(b)[0])
    np.testing.assert_array_equal(read_series(a)[0], vol.astype(np.float32) + INTERCEPT)


# --- NIfTI masks -------------------------------------------------------------------------------


def _converter_nifti(geo: Geometry, labels: np.ndarray) -> nib.Nifti1Image:
    """labels[k, r, c] stored as data[c, r, k] with the RAS+ affine, as dcm2niix/nibabel tools do."""
    data = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))
    return nib.Nifti1Image(data, LPS_TO_RAS @ geo.lps_affine())


def _padded(img: nib.Nifti1Image, pad: int) -> nib.Nifti1Image:
    """The same mask on a grid larger by ``pad`` voxels on every side (zeros outside)."""
    data = np.pad(np.asanyarray(img.dataobj), pad)
    shift = np.eye(4)
    shift[:3, 3] = -pad
    return nib.Nifti1Image(data, img.affine @ shift)


LAYOUTS = {
    "converter": lambda img: img,
    "slices-reversed": lambda img: img.as_reoriented(np.array([[0, 1], [1, 1], [2, -1]])),
    "rows-flipped": lambda img: img.as_reoriented(np.array([[0, 1], [1, -1], [2, 1]])),
    "transposed-flipped": lambda img: img.as_reoriented(np.array([[2, -1], [0, 1], [1, -1]])),
    "closest-canonical": nib.as_closest_canonical,
    "padded": lambda img: _padded(img, 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nifti_mask_aligns_voxel_for_voxel(written: Written, tmp_path: Path, layout: str) -> None:
    geo, labels = written.geo, _labels()
    header = _one_series(tmp_path / "images")
    plain = _converter_nifti(geo, labels)
    img = LAYOUTS[layout](plain)
    on_disk = np.asanyarray(img.dataobj)
    if layout != "converter":  # the voxel order on disk really differs
        assert on_disk.shape != plain.shape or not np.array_equal(on_disk, np.asanyarray(plain.dataobj))
    path = tmp_path / "labels" / f"{header.series_uid}.nii.gz"
    path.parent.mkdir()
    nib.save(img, str(path))

    expected = _in_header_order(geo, labels)
    mask = load_mask(path, header)
    assert mask.dtype == np.uint8 and mask.shape == (N_SLICES, ROWS, COLS)
    np.testing.assert_array_equal(mask, expected)
    # found and loaded through the site's mask index too
    index = index_masks(tmp_path / "labels", scan_site(tmp_path / "images"))
    assert index.sources == {header.series_uid: path} and not index.problems
    np.testing.assert_array_equal(index.load(header), expected)


def _shifted(img: nib.Nifti1Image, lps_mm: np.ndarray) -> nib.Nifti1Image:
    aff = img.affine.copy()
    aff[:3, 3] += LPS_TO_RAS[:3, :3] @ lps_mm
    return nib.Nifti1Image(np.asanyarray(img.dataobj), aff)


@pytest.mark.parametrize("axis", ["column", "row", "slice"])
def test_nifti_mask_half_a_voxel_off_is_refused(written: Written, tmp_path: Path, axis: str) -> None:
    geo = written.geo
    header = _one_series(tmp_path / "images")
    dr, dc = geo.spacing
    half = {"column": geo.row_dir * dc / 2, "row": geo.col_dir * dr / 2, "slice": geo.step / 2}[axis]
    # padded, so that the shifted mask still covers the series: the error is the half-voxel offset
    img = _shifted(_padded(_converter_nifti(geo, _labels()), 2), half)
    path = tmp_path / f"{header.series_uid}.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(FedscanError, match="grid"):
        load_mask(path, header)
    # a whole voxel off is on the grid again: accepted, and the labels move by one voxel
    nib.save(_shifted(_padded(_converter_nifti(geo, _labels()), 2), 2 * half), str(path))
    moved = load_mask(path, header)
    assert not np.array_equal(moved, _in_header_order(geo, _labels()))


@pytest.mark.parametrize("drop", ["first", "last"])
def test_nifti_mask_with_too_few_slices_is_refused(written: Written, tmp_path: Path, drop: str) -> None:
    geo, labels = written.geo, _labels()
    header = _one_series(tmp_path / "images")
    if drop == "first":  # drop written slice 0 and move the origin to written slice 1
        geo_short = Geometry(geo.row_dir, geo.col_dir, geo.step, geo.origin + geo.step, geo.spacing)
        img = _converter_nifti(geo_short, labels[1:])
    else:
        img = _converter_nifti(geo, labels[:-1])
    path = tmp_path / f"{header.series_uid}.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(FedscanError, match="cover"):
        load_mask(path, header)


def test_nifti_mask_of_another_orientation_is_refused(tmp_path: Path) -> None:
    """A mask written on the sagittal grid does not fit an axial series of the same size."""
    geo = Geometry.make("axial", 1)
    write_series(tmp_path / "images", geo, _volume(), seed=3)
    header = _one_series(tmp_path / "images")
    other = Geometry.make("sagittal", 1)
    other.origin = geo.origin
    path = tmp_path / f"{header.series_uid}.nii.gz"
    nib.save(_converter_nifti(other, _labels()), str(path))
    with pytest.raises(FedscanError):
        load_mask(path, header)


# --- DICOM SEG ---------------------------------------------------------------------------------


def _write_seg(path: Path, written: Written, labels: np.ndarray) -> Dataset:
    """A BINARY SEG with segments 1 and 2, built by highdicom from the datasets in written order."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    order = [written.sops.index(str(ds.SOPInstanceUID)) for ds in written.datasets]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=prop,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, label, prop in ((1, "organ", codes.SCT.Organ), (2, "lesion", codes.SCT.Neoplasm))
    ]
    seg = hd.seg.Segmentation(
        source_images=written.datasets,
        pixel_array=labels[order],  # frame i labels source_images[i]
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return seg


def test_dicom_seg_aligns_voxel_for_voxel(written: Written, tmp_path: Path) -> None:
    labels = _labels()
    seg_path = tmp_path / "images" / "seg" / "deep" / "SEGOBJECT"  # among the images, no extension
    seg = _write_seg(seg_path, written, labels)
    assert int(seg.NumberOfFrames) < 2 * N_SLICES  # the empty frames really were omitted

    scan = scan_site(tmp_path / "images")
    assert not scan.skipped and len(scan.series) == 1
    assert scan.segs == [seg_path]
    header = scan.series[0]
    expected = _in_header_order(written.geo, labels)

    index = index_masks(tmp_path / "labels", scan)
    assert index.sources == {header.series_uid: seg_path} and not index.problems
    mask = index.load(header)
    assert mask.dtype == np.uint8 and mask.shape == (N_SLICES, ROWS, COLS)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(load_seg(seg_path, header), expected)


def test_dicom_seg_and_nifti_agree(tmp_path: Path) -> None:
    """The same labels through a SEG and through a reordered NIfTI give the same mask."""
    geo = Geometry.make("coronal", -1)
    written = write_series(tmp_path / "images", geo, _volume(), seed=4)
    labels = _labels(seed=9)
    seg_path = tmp_path / "images" / "seg.dcm"
    _write_seg(seg_path, written, labels)
    scan = scan_site(tmp_path / "images")
    header = scan.series[0]
    nifti = tmp_path / "other" / f"{header.series_uid}.nii.gz"
    nifti.parent.mkdir()
    nib.save(nib.as_closest_canonical(_converter_nifti(geo, labels)), str(nifti))
    from_seg, from_nifti = load_seg(seg_path, header), load_mask(nifti, header)
    np.testing.assert_array_equal(from_seg, from_nifti)
    np.testing.assert_array_equal(from_seg, labels[::-1])
    # and the labels sit on the pixels they were drawn on
    pixels = read_series(header)[0]
    drawn_on = _volume()[::-1].astype(np.float32) + INTERCEPT
    np.testing.assert_array_equal(pixels[from_seg == 2], drawn_on[labels[::-1] == 2])
