"""`fedscan synth`: synthetic hospitals, CT-like DICOM series with labels, one folder per site."""

from __future__ import annotations

from pathlib import Path

import typer

from fedscan.common.cli.root import app, console, out_console, user_errors
from fedscan.common.errors import FedscanError


@app.command()
def synth(
    sites: int = typer.Option(3, "--sites", help="Number of hospitals to create."),
    out: Path = typer.Option(..., "--out", help="Folder to write the hospitals into."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same files."),
    task: str = typer.Option(
        "segmentation", "--task", help="segmentation (masks) or classification (labels.csv)."
    ),
    label_level: str = typer.Option(
        "exam", "--label-level", help="Classification: label whole exams (exam) or single images (image)."
    ),
    scenario: str = typer.Option(
        "default",
        "--scenario",
        help="default, or heterogeneous (at least 4 sites: a clean one, heavy noise, another intensity "
        "calibration, a small one).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing, non-empty --out."),
) -> None:
    """Create synthetic hospitals: CT-like DICOM series with labels, one folder per site.

    Segmentation writes lesion masks; classification writes exams of 6-16 slices with a
    label per exam (a lesion in any slice) or per image in labels/labels.csv. Sites differ
    like real hospitals do (noise, blur, calibration, slice thickness, scanner, size, lesion
    prevalence, and one site with noisy labels); manifest.json records how.
    """
    with user_errors():
        if sites < 1:
            raise FedscanError(f"--sites must be at least 1, got {sites}")
        from fedscan.common.data.synthetic import synthesize

        with console.status("writing synthetic hospitals") as status:
            manifest = synthesize(
                out,
                sites,
                seed,
                overwrite=overwrite,
                task=task.strip().lower(),
                label_level=label_level.strip().lower(),
                scenario=scenario.strip().lower(),
                on_site=lambda name: status.update(f"writing {name}"),
            )
        for prof in manifest.sites:
            c = manifest.counts[prof.name]
            if manifest.task == "classification":
                out_console.print(
                    f"{prof.name}: {c['exams']} exams, {c['slices']} slices, {c['labelled_positive']} "
                    f"exams labelled positive ({prof.manufacturer}, noise {prof.noise_hu} HU)"
                )
                continue
            out_console.print(
                f"{prof.name}: {c['patients']} patients, {c['slices']} slices, "
                f"{c['lesion_slices']} with lesions ({prof.manufacturer}, noise {prof.noise_hu} HU)"
            )
        out_console.print(f"wrote {len(manifest.sites)} sites to {out} (see {out}/manifest.json)")
