"""Write synthetic chest phantoms as DICOM Digital X-Ray (DX, For Presentation) studies."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

from medidiff.datasets.chest_phantom import TEST_SEEDS, make_pair

BITS_STORED = 12
_MAX = 2**BITS_STORED - 1
_STUDY_DATE, _STUDY_TIME = "20000101", "120000"


def _uid(seed: int, *parts: str) -> str:
    return generate_uid(entropy_srcs=["medidiff-synthetic-cxr", str(seed), *parts])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _dx_dataset(
    image: np.ndarray,
    *,
    seed: int,
    spacing_mm: float,
    monochrome1: bool,
    patient_id: str,
    series: str,
    series_number: int,
    description: str,
) -> Dataset:
    """Build a DX For Presentation dataset holding ``image`` (MONOCHROME2 values in [0, 1])."""
    values = np.round(np.clip(image, 0.0, 1.0) * _MAX).astype(np.uint16)
    if monochrome1:
        values = _MAX - values
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, series, "instance")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # SOP Common
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    # Patient (clearly synthetic)
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = _uid(seed, "study")
    ds.StudyDate, ds.StudyTime = _STUDY_DATE, _STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"S{seed}"
    ds.AccessionNumber = ""
    ds.StudyDescription = "SYNTHETIC CHEST PHANTOM"
    # General Series + DX Series
    ds.Modality = "DX"
    ds.SeriesInstanceUID = _uid(seed, series, "series")
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.BodyPartExamined = "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment
    ds.Manufacturer = "medidiff synthetic phantom"
    ds.ManufacturerModelName = "chest_phantom"
    # General Image + DX Image
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate, ds.ContentTime = _STUDY_DATE, _STUDY_TIME
    # The simulated radiograph stands for an acquisition; the soft-tissue reference for what
    # dual-energy subtraction derives from one (pipelines select ORIGINAL images only).
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if series == "cxr" else ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS_STORED, BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelData = values.tobytes()
    # VOI LUT
    ds.WindowCenter, ds.WindowWidth = (_MAX + 1) // 2, _MAX + 1
    # DX Anatomy Imaged + DX Positioning
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code("43799004", "SCT", "Chest")])
    ds.ViewPosition = "PA"
    ds.PositionerType = ""
    ds.ViewCodeSequence = Sequence([_code("399348003", "SCT", "postero-anterior")])
    # DX Detector
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.PixelSpacing = [spacing_mm, spacing_mm]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "synthetic parallel-beam phantom, no magnification"
    # Acquisition Context
    ds.AcquisitionContextSequence = Sequence([])
    return ds


def write_dx_study(
    pair_or_image: Mapping | np.ndarray,
    out_dir: str | Path,
    *,
    seed: int,
    monochrome1: bool | None = None,
    patient_id: str | None = None,
    spacing_mm: float | None = None,
    reference: bool = False,
    compress: bool = False,
) -> list[Path]:
    """Write the CXR (and with ``reference=True`` its soft-tissue image) as DX files.

    ``pair_or_image`` is a ``make_pair`` dict or a (rows, cols) MONOCHROME2 array in [0, 1].
    ``monochrome1=None`` follows the pair's meta flag.  The reference goes to
    ``out_dir/reference/`` as its own series of the same study.  ``compress`` stores
    JPEG-LS lossless.  Returns the written paths.
    """
    pair = dict(pair_or_image) if isinstance(pair_or_image, Mapping) else {"cxr": pair_or_image}
    meta = pair.get("meta", {})
    if monochrome1 is None:
        monochrome1 = bool(meta.get("monochrome1", False))
    if spacing_mm is None:
        spacing_mm = float(meta.get("pixel_spacing_mm", 400.0 / pair["cxr"].shape[1]))
    patient_id = patient_id or f"SYNTH-{seed:08d}"
    out_dir = Path(out_dir)
    jobs = [("cxr", out_dir, 1, "SYNTHETIC PA CHEST")]
    if reference:
        jobs.append(("soft", out_dir / "reference", 2, "SYNTHETIC SOFT-TISSUE REFERENCE"))
    paths = []
    for key, folder, number, description in jobs:
        ds = _dx_dataset(
            pair[key],
            seed=seed,
            spacing_mm=round(spacing_mm, 6),
            monochrome1=monochrome1,
            patient_id=patient_id,
            series=key,
            series_number=number,
            description=description,
        )
        if compress:
            ds.compress(JPEGLSLossless, generate_instance_uid=False)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}-{seed}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


SAMPLE_SEED = 3_000_000  # outside the train/val/test seed ranges
SAMPLE_SIZE = 2048


def main(argv: list[str] | None = None) -> None:
    """CLI: ``--sample OUT`` writes the bundled sample; ``--count N --size S OUT`` writes N studies."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sample", action="store_true", help="write the bundled 2048x2048 sample study")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--first-seed", type=int, default=TEST_SEEDS.start)
    parser.add_argument("--reference", action="store_true", help="also write the soft-tissue reference")
    args = parser.parse_args(argv)
    if args.sample:
        pair = make_pair(SAMPLE_SEED, SAMPLE_SIZE)
        paths = write_dx_study(pair, args.out, seed=SAMPLE_SEED, reference=True, compress=True)
    else:
        paths = []
        for seed in range(args.first_seed, args.first_seed + args.count):
            pair = make_pair(seed, args.size)
            paths += write_dx_study(pair, args.out / f"study-{seed}", seed=seed, reference=args.reference)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
