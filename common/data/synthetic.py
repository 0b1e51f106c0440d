"""Synthetic hospitals: CT-like 2D phantom series written as real DICOM, with labels.

Each site gets its own scanner and protocol: noise, blur, calibration, stored-value
encoding, slice thickness, manufacturer, number of patients, lesion prevalence, and at one
site noisy labels. Every setting is recorded in ``manifest.json``. The same seed gives the
same files, byte for byte. The layout is the site contract of ``fedscan.common.data.layout``.

Two tasks:

- ``segmentation``: 12 slices per patient, lesions drawn slice by slice, NIfTI masks
  ``labels/<SeriesInstanceUID>.nii.gz``.
- ``classification``: one exam (series) per patient, of 6 to 16 slices. An exam is positive
  when a hypodense liver lesion (radius 18-30 mm, 90-140 HU below liver) runs through 4-6
  consecutive slices of it; the share of positive exams
  (``lesion_prevalence``) differs between sites. ``labels/labels.csv`` labels exams by
  SeriesInstanceUID (``label_level="exam"``) or single images by SOPInstanceUID
  (``label_level="image"``: 1 where the slice shows the lesion). Every exam also gets a NIfTI
  lesion mask (all zero without a lesion), for scoring explanations; training does not read it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydantic import BaseModel
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from fedscan.common.errors import FedscanError

GENERATOR = "fedscan synth"
SLICES_PER_PATIENT = 12
MIN_PATIENTS = 3
PATIENT_RATIO = 5.0  # largest site / smallest site, at least
# classification: one exam per patient, of varying length
MIN_EXAMS = 32
EXAM_RATIO = 4.0
EXAM_SLICES = (6, 16)
LABEL_LEVELS = ("exam", "image")

_MANUFACTURERS = [
    ("GE MEDICAL SYSTEMS", "Revolution CT"),
    ("SIEMENS", "SOMATOM Force"),
    ("Philips", "IQon Spectral CT"),
    ("Canon Medical Systems", "Aquilion ONE"),
    ("FUJIFILM Healthcare", "SCENARIA View"),
]


class SiteProfile(BaseModel):
    """How one synthetic hospital's scanner, protocol and annotators behave."""

    name: str
    n_patients: int
    slices_per_patient: int
    matrix: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    noise_hu: float
    blur_sigma_px: float
    hu_scale: float  # scanner calibration error: measured = true * scale + offset
    hu_offset: float
    rescale_slope: float
    rescale_intercept: float
    pixel_representation: int  # 0 unsigned, 1 signed
    window_center: float
    window_width: float
    manufacturer: str
    manufacturer_model: str
    # segmentation: probability that a slice shows at least one lesion;
    # classification: probability that an exam holds a lesion
    lesion_prevalence: float
    label_noise: float  # probability that an annotator missed a lesion (mask also jittered)
    file_extension: str
    task: str = "segmentation"
    min_slices_per_patient: int | None = None  # classification: exams vary in length


class Manifest(BaseModel):
    generator: str = GENERATOR
    seed: int
    scenario: str = "default"
    task: str = "segmentation"
    label_level: str | None = None
    sites: list[SiteProfile]
    counts: dict[str, dict[str, int]]


def site_names(n_sites: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        f"hospital-{letters[i]}" if i < 26 else f"hospital-{letters[i // 26 - 1]}{letters[i % 26]}"
        for i in range(n_sites)
    ]


SCENARIOS = ("default", "heterogeneous")


def _heterogeneous(profiles: list[SiteProfile]) -> list[SiteProfile]:
    """Sharper differences, one kind per site: a clean reference site, one with heavy noise, one
    with another intensity calibration, one small; the sites after them keep their drawn settings.
    Annotators are exact everywhere, so that only the images differ."""
    if len(profiles) < 4:
        raise FedscanError(f"the heterogeneous scenario needs at least 4 sites, got {len(profiles)}")
    changes: list[dict[str, Any]] = [
        {
            "noise_hu": 10.0,
            "blur_sigma_px": 0.3,
            "hu_scale": 1.0,
            "hu_offset": 0.0,
            "n_patients": 12,
        },  # reference
        {
            "noise_hu": 90.0,
            "blur_sigma_px": 0.3,
            "hu_scale": 1.0,
            "hu_offset": 0.0,
            "n_patients": 10,
        },  # heavy noise
        {
            "noise_hu": 12.0,
            "blur_sigma_px": 0.3,
            "hu_scale": 1.3,
            "hu_offset": 150.0,
            "n_patients": 10,
        },  # calibration
        {"noise_hu": 12.0, "blur_sigma_px": 0.3, "hu_scale": 1.0, "hu_offset": 0.0, "n_patients": 3},  # small
    ]
    out = [p.model_copy(update={**c, "label_noise": 0.0}) for p, c in zip(profiles, changes, strict=False)]
    return out + [p.model_copy(update={"label_noise": 0.0}) for p in profiles[len(changes) :]]


def make_profiles(
    n_sites: int, seed: int, task: str = "segmentation", scenario: str = "default"
) -> list[SiteProfile]:
    """Draw each site's settings so that the sites differ the way hospitals do; the
    ``heterogeneous`` scenario sets one difference per site on purpose (``_heterogeneous``)."""
    if scenario not in SCENARIOS:
        raise FedscanError(f"unknown scenario '{scenario}'; allowed: {', '.join(SCENARIOS)}")
    if n_sites < 1:
        raise FedscanError(f"--sites must be at least 1, got {n_sites}")
    if task not in ("segmentation", "classification"):
        raise FedscanError(f"unknown task '{task}'; allowed: segmentation, classification")
    rng = np.random.default_rng([seed, 7919])

    def spread(lo: float, hi: float) -> np.ndarray:
        vals = np.linspace(lo, hi, n_sites) if n_sites > 1 else np.array([(lo + hi) / 2])
        return rng.permutation(vals)

    if n_sites == 1:
        patients = [8]
    else:
        ratio = np.geomspace(1.0, PATIENT_RATIO, n_sites)
        patients = [int(round(MIN_PATIENTS * r)) for r in ratio]
    noise = spread(8.0, 30.0)
    blur = spread(0.0, 1.2)
    scale = spread(0.94, 1.06)
    offset = spread(-30.0, 30.0)
    thickness = spread(1.25, 5.0)
    prevalence = spread(0.35, 0.75)
    matrices = [192, 224, 256]
    encodings = [(1.0, -1024.0, 0), (1.0, 0.0, 1), (0.5, -1024.0, 0), (1.0, -1000.0, 1)]
    windows = [(40.0, 400.0), (50.0, 350.0), (60.0, 360.0), (35.0, 450.0)]
    label_noise_site = 1 if n_sites >= 2 else -1
    profiles = []
    for i, name in enumerate(site_names(n_sites)):
        matrix = matrices[int(rng.integers(len(matrices)))]
        fov = float(rng.uniform(340.0, 400.0))
        slope, intercept, pixrep = encodings[i % len(encodings)]
        wc, ww = windows[i % len(windows)]
        make, model = _MANUFACTURERS[i % len(_MANUFACTURERS)]
        profiles.append(
            SiteProfile(
                name=name,
                n_patients=patients[i],
                slices_per_patient=SLICES_PER_PATIENT,
                matrix=matrix,
                pixel_spacing_mm=round(fov / matrix, 4),
                slice_thickness_mm=round(float(thickness[i]), 2),
                noise_hu=round(float(noise[i]), 1),
                blur_sigma_px=round(float(blur[i]), 2),
                hu_scale=round(float(scale[i]), 3),
                hu_offset=round(float(offset[i]), 1),
                rescale_slope=slope,
                rescale_intercept=intercept,
                pixel_representation=pixrep,
                window_center=wc,
                window_width=ww,
                manufacturer=make,
                manufacturer_model=model,
                lesion_prevalence=round(float(prevalence[i]), 2),
                label_noise=0.2 if i == label_noise_site else 0.0,
                file_extension="" if i % 2 else ".dcm",
            )
        )
    if task == "classification":
        exams = [int(round(MIN_EXAMS * r)) for r in np.geomspace(1.0, EXAM_RATIO, n_sites)]
        if n_sites == 1:
            exams = [32]
        exam_prevalence = spread(0.2, 0.6)
        profiles = [
            p.model_copy(
                update={
                    "task": task,
                    "n_patients": exams[i],
                    "slices_per_patient": EXAM_SLICES[1],
                    "min_slices_per_patient": EXAM_SLICES[0],
                    "lesion_prevalence": round(float(exam_prevalence[i]), 2),
                    "label_noise": 0.1 if p.label_noise > 0 else 0.0,
                }
            )
            for i, p in enumerate(profiles)
        ]
    return _heterogeneous(profiles) if scenario == "heterogeneous" else profiles


# --- the phantom ------------------------------------------------------------------------


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


class _Patient:
    """One patient's anatomy: smooth organ shapes that vary along z."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.body = (rng.uniform(150, 180), rng.uniform(105, 130))
        self.fat = rng.uniform(8, 20)
        self.liver = (rng.uniform(-70, -50), rng.uniform(-20, 0), rng.uniform(60, 75), rng.uniform(50, 65))
        self.spleen = (rng.uniform(65, 85), rng.uniform(10, 30), rng.uniform(25, 35), rng.uniform(32, 45))
        self.kidney_y = rng.uniform(45, 60)
        self.phase = rng.uniform(0, 2 * np.pi, size=4)

    def slice_hu(
        self, x: np.ndarray, y: np.ndarray, z: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """True HU image at height z (mm), and the liver ellipse lesions are placed in."""
        s = [1.0 + 0.12 * np.sin(z / 18.0 + p) for p in self.phase]
        img = np.full(x.shape, -1000.0, dtype=np.float64)
        bx, by = self.body
        img[_ellipse(x, y, 0, 0, bx * s[0], by * s[0])] = -100.0  # subcutaneous fat
        f = self.fat
        img[_ellipse(x, y, 0, 0, bx * s[0] - f, by * s[0] - f)] = 40.0  # soft tissue
        lx, ly, lax, lay = self.liver
        liver = (lx, ly, lax * s[1], lay * s[1])
        img[_ellipse(x, y, *liver)] = 60.0
        sx, sy, sax, say = self.spleen
        img[_ellipse(x, y, sx, sy, sax * s[2], say * s[2])] = 50.0
        for side in (-1, 1):
            img[_ellipse(x, y, side * 55, self.kidney_y, 20 * s[3], 28 * s[3])] = 150.0
        img[_ellipse(x, y, 15, 40, 11, 11)] = 180.0  # aorta, left of the midline
        img[_ellipse(x, y, 0, 78, 19, 17)] = 600.0  # vertebral body
        img[_ellipse(x, y, 0, 80, 7, 6)] = 20.0  # spinal canal
        for _ in range(int(rng.integers(0, 4))):  # bowel gas, anterior
            gx, gy = rng.uniform(-40, 60), rng.uniform(-80, -30)
            r = rng.uniform(4, 10)
            img[_ellipse(x, y, gx, gy, r, r * rng.uniform(0.7, 1.3))] = -900.0
        return img, liver


def _draw_lesions(
    img: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    liver: tuple[float, float, float, float],
    prevalence: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Paint 0-3 lesions inside the liver; return each lesion's pixel-exact mask."""
    if rng.random() >= prevalence:
        return []
    k = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    lx, ly, lax, lay = liver
    masks = []
    for _ in range(k):
        r = rng.uniform(9.0, 22.0)
        # keep the centre far enough inside the liver for the whole lesion to fit
        ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
        cx = lx + np.cos(ang) * rad * max(lax - r, 1.0)
        cy = ly + np.sin(ang) * rad * max(lay - r, 1.0)
        m = _ellipse(x, y, cx, cy, r, r * rng.uniform(0.75, 1.25))
        contrast = rng.uniform(50, 100) * (1 if rng.random() < 0.4 else -1)
        img[m] = 60.0 + contrast
        masks.append(m)
    return masks


def _annotate(lesions: list[np.ndarray], label_noise: float, rng: np.random.Generator) -> np.ndarray:
    """The annotator's mask: exact, or at a noisy site missing lesions and off by a pixel."""
    if not lesions:
        return np.zeros((1, 1), dtype=bool)
    out = np.zeros_like(lesions[0])
    for m in lesions:
        if label_noise > 0:
            if rng.random() < label_noise:
                continue  # missed by the annotator
            op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
            m = op(m, iterations=1)
        out |= m
    return out


def _dicom_slice(
    profile: SiteProfile,
    stored: np.ndarray,
    *,
    patient_idx: int,
    uids: dict[str, str],
    sop_uid: str,
    ipp: list[float],
    instance: int,
    rng_vals: dict[str, str],
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    site_tag = profile.name.split("-")[-1].upper()
    ds.PatientName = f"SYNTHETIC^PATIENT{patient_idx:03d}^{site_tag}"
    ds.PatientID = f"FS{site_tag}{patient_idx:05d}"
    ds.PatientBirthDate = rng_vals["birth"]
    ds.PatientSex = rng_vals["sex"]
    ds.StudyDate = rng_vals["study_date"]
    ds.SeriesDate = rng_vals["study_date"]
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{site_tag}{patient_idx:06d}"
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.manufacturer_model
    ds.InstitutionName = f"Synthetic {profile.name.replace('-', ' ').title()}"
    ds.BodyPartExamined = "ABDOMEN"
    ds.KVP = "120"
    ds.SeriesNumber = 2
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [f"{profile.pixel_spacing_mm:.4f}"] * 2
    ds.SliceThickness = f"{profile.slice_thickness_mm:.2f}"
    ds.SliceLocation = f"{ipp[2]:.4f}"
    ds.RescaleIntercept = f"{profile.rescale_intercept:g}"
    ds.RescaleSlope = f"{profile.rescale_slope:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = f"{profile.window_center:g}"
    ds.WindowWidth = f"{profile.window_width:g}"
    # Rows, Columns, SamplesPerPixel, BitsAllocated/Stored, HighBit, PixelRepresentation (from
    # the dtype: int16 or uint16 by the profile) and Pixel Data
    ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
    return ds


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=["fedscan-synth", str(seed), *map(str, parts)])


def _acquire_and_save(
    hu: np.ndarray,
    profile: SiteProfile,
    rng: np.random.Generator,
    *,
    seed: int,
    patient_idx: int,
    k: int,
    uids: dict[str, str],
    rng_vals: dict[str, str],
    ipp: list[float],
    series_dir: Path,
) -> str:
    """Pass a true-HU slice through the site's scanner (blur, noise, calibration, encoding)
    and write it as DICOM; return its SOPInstanceUID."""
    if profile.blur_sigma_px > 0:
        hu = ndimage.gaussian_filter(hu, profile.blur_sigma_px)
    hu = hu + rng.normal(0.0, profile.noise_hu, size=hu.shape)
    measured = hu * profile.hu_scale + profile.hu_offset
    dtype = np.int16 if profile.pixel_representation else np.uint16
    info = np.iinfo(dtype)
    stored = np.round((measured - profile.rescale_intercept) / profile.rescale_slope)
    stored = np.clip(stored, info.min, info.max).astype(dtype)
    sop = _uid(seed, profile.name, patient_idx, "sop", k)
    ds = _dicom_slice(
        profile,
        stored,
        patient_idx=patient_idx,
        uids=uids,
        sop_uid=sop,
        ipp=ipp,
        instance=k + 1,
        rng_vals=rng_vals,
    )
    fname = _uid(seed, profile.name, patient_idx, "file", k)[-12:].replace(".", "") + profile.file_extension
    ds.save_as(series_dir / fname, enforce_file_format=True)
    return sop


def _patient_identity(
    rng: np.random.Generator, seed: int, profile: SiteProfile, p: int, images: Path
) -> tuple[dict[str, str], dict[str, str], Path]:
    uids = {k: _uid(seed, profile.name, p, k) for k in ("study", "series", "frame")}
    rng_vals = {
        "birth": f"19{int(rng.integers(30, 90)):02d}0{int(rng.integers(1, 10))}15",
        "sex": "F" if rng.random() < 0.5 else "M",
        "study_date": f"2025{int(rng.integers(1, 13)):02d}{int(rng.integers(10, 29)):02d}",
    }
    series_dir = images / f"{_uid(seed, profile.name, p, 'dir')[-10:]}"
    series_dir.mkdir(parents=True, exist_ok=True)
    return uids, rng_vals, series_dir


def _grid(profile: SiteProfile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = profile.matrix
    coords = (np.arange(n) - (n - 1) / 2.0) * profile.pixel_spacing_mm
    x, y = np.meshgrid(coords, coords)  # x along columns (patient left), y along rows (posterior)
    return coords, x, y


def write_site(
    root: Path, profile: SiteProfile, seed: int, site_index: int, label_level: str = "exam"
) -> dict[str, int]:
    """Write one site folder: images/ (DICOM) and labels/ (NIfTI masks or labels.csv)."""
    if profile.task == "classification":
        return _write_exam_site(root, profile, seed, site_index, label_level)
    rng = np.random.default_rng([seed, site_index, 104729])
    site = root / profile.name
    images, labels = site / "images", site / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    n = profile.matrix
    dx = profile.pixel_spacing_mm
    coords, x, y = _grid(profile)
    counts = {"patients": profile.n_patients, "slices": 0, "lesion_slices": 0, "lesions": 0}
    for p in range(profile.n_patients):
        anatomy = _Patient(rng)
        uids, rng_vals, series_dir = _patient_identity(rng, seed, profile, p, images)
        z0 = float(rng.uniform(-200, -150))
        dz = profile.slice_thickness_mm
        nz = profile.slices_per_patient
        mask_vol = np.zeros((n, n, nz), dtype=np.uint8)  # NIfTI order: (column, row, slice)
        for k in range(nz):
            z = z0 + k * dz
            hu, liver = anatomy.slice_hu(x, y, z, rng)
            lesions = _draw_lesions(hu, x, y, liver, profile.lesion_prevalence, rng)
            mask = _annotate(lesions, profile.label_noise, rng)
            if lesions:
                counts["lesion_slices"] += 1
                counts["lesions"] += len(lesions)
                mask_vol[:, :, k] = mask.T
            _acquire_and_save(
                hu,
                profile,
                rng,
                seed=seed,
                patient_idx=p,
                k=k,
                uids=uids,
                rng_vals=rng_vals,
                ipp=[float(coords[0]), float(coords[0]), z],
                series_dir=series_dir,
            )
            counts["slices"] += 1
        _save_mask(labels / f"{uids['series']}.nii.gz", mask_vol, coords, dx, dz, z0)
    return counts


def _save_mask(path: Path, mask_vol: np.ndarray, coords: np.ndarray, dx: float, dz: float, z0: float) -> None:
    """Write a (column, row, slice) mask as NIfTI in the series' patient geometry."""
    # voxel (c, r, k) -> LPS = ipp0 + c*dx*[1,0,0] + r*dx*[0,1,0] + k*dz*[0,0,1]; RAS flips x, y
    lps = np.array([[dx, 0, 0, coords[0]], [0, dx, 0, coords[0]], [0, 0, dz, z0], [0, 0, 0, 1.0]])
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    img = nib.Nifti1Image(mask_vol, ras)
    img.set_qform(ras, code=1)
    img.set_sform(ras, code=1)
    nib.save(img, path)


def _write_exam_site(
    root: Path, profile: SiteProfile, seed: int, site_index: int, label_level: str
) -> dict[str, int]:
    """Classification: one exam per patient, labelled per exam or per image in labels.csv."""
    rng = np.random.default_rng([seed, site_index, 104729, 2])
    site = root / profile.name
    images, labels = site / "images", site / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    coords, x, y = _grid(profile)
    lo = profile.min_slices_per_patient or profile.slices_per_patient
    counts = {
        "exams": profile.n_patients,
        "positive_exams": 0,
        "labelled_positive": 0,
        "slices": 0,
        "lesion_slices": 0,
    }
    rows: list[tuple[str, int]] = []
    for p in range(profile.n_patients):
        anatomy = _Patient(rng)
        uids, rng_vals, series_dir = _patient_identity(rng, seed, profile, p, images)
        z0 = float(rng.uniform(-200, -150))
        nz = int(rng.integers(lo, profile.slices_per_patient + 1))
        mask_vol = np.zeros((profile.matrix, profile.matrix, nz), dtype=np.uint8)  # (column, row, slice)
        positive = bool(rng.random() < profile.lesion_prevalence)
        missed = bool(rng.random() < profile.label_noise)  # the reader overlooked the lesion
        span = range(0)
        if positive:  # one hypodense lesion, like a metastasis on portal-venous CT
            length = int(rng.integers(4, 7))
            start = int(rng.integers(0, nz - length + 1))
            span = range(start, start + length)
            r0 = float(rng.uniform(18.0, 30.0))
            aspect = float(rng.uniform(0.75, 1.25))
            ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
            contrast = -rng.uniform(90, 140)
        for k in range(nz):
            z = z0 + k * profile.slice_thickness_mm
            hu, liver = anatomy.slice_hu(x, y, z, rng)
            if k in span:
                # a rounded lesion: widest in the middle of its slices
                mid = (span.start + span.stop - 1) / 2.0
                r = r0 * (1.0 - 0.3 * abs(k - mid) / max(len(span) / 2.0, 1.0))
                lx, ly, lax, lay = liver
                cx = lx + np.cos(ang) * rad * max(lax - r, 1.0)
                cy = ly + np.sin(ang) * rad * max(lay - r, 1.0)
                lesion = _ellipse(x, y, cx, cy, r, r * aspect)
                hu[lesion] = 60.0 + contrast
                mask_vol[:, :, k] = lesion.T
                counts["lesion_slices"] += 1
            sop = _acquire_and_save(
                hu,
                profile,
                rng,
                seed=seed,
                patient_idx=p,
                k=k,
                uids=uids,
                rng_vals=rng_vals,
                ipp=[float(coords[0]), float(coords[0]), z],
                series_dir=series_dir,
            )
            if label_level == "image":
                rows.append((sop, int(k in span and not missed)))
            counts["slices"] += 1
        # where the lesion is (the truth, not the reader's label): for explanations, not for training
        _save_mask(
            labels / f"{uids['series']}.nii.gz",
            mask_vol,
            coords,
            profile.pixel_spacing_mm,
            profile.slice_thickness_mm,
            z0,
        )
        counts["positive_exams"] += int(positive)
        counts["labelled_positive"] += int(positive and not missed)
        if label_level == "exam":
            rows.append((uids["series"], int(positive and not missed)))
    key = "SeriesInstanceUID" if label_level == "exam" else "SOPInstanceUID"
    lines = [f"{key},label"] + [f"{uid},{label}" for uid, label in sorted(rows)]
    (labels / "labels.csv").write_text("\n".join(lines) + "\n")
    return counts


def synthesize(
    out: Path,
    n_sites: int,
    seed: int = 0,
    overwrite: bool = False,
    on_site: Callable[[str], None] | None = None,
    task: str = "segmentation",
    label_level: str = "exam",
    scenario: str = "default",
) -> Manifest:
    """Write ``n_sites`` synthetic hospitals under ``out``; all or nothing.

    ``label_level`` (classification only): ``exam`` labels each series, ``image`` each slice.
    """
    out = Path(out)
    if label_level not in LABEL_LEVELS:
        raise FedscanError(f"unknown label level '{label_level}'; allowed: {', '.join(LABEL_LEVELS)}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FedscanError(
                f"output folder {out} already exists and is not empty",
                hint="choose a new --out, or pass --overwrite to replace it",
            )
    profiles = make_profiles(n_sites, seed, task, scenario)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts = {}
        for i, prof in enumerate(profiles):
            if on_site:
                on_site(prof.name)
            counts[prof.name] = write_site(tmp, prof, seed, i, label_level)
        manifest = Manifest(
            seed=seed,
            scenario=scenario,
            task=task,
            sites=profiles,
            counts=counts,
            label_level=label_level if task == "classification" else None,
        )
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(root: Path) -> Manifest | None:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return None
    return Manifest.model_validate(json.loads(path.read_text()))
