"""`fedscan site ...`: what a hospital runs on its own machine: its key and SuperNode, the check of its
data, and the model's predictions and explanations on it. Nothing here sends data anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedscan.common.cli.root import app, console, out_console, user_errors
from fedscan.common.errors import FedscanError

site_app = typer.Typer(
    name="site",
    help="Commands a hospital runs on its own machine.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(site_app, name="site")


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


@site_app.command("init")
def site_init(
    dir: Path = typer.Option(..., "--dir", help="The site folder to create (keys, config, cache, logs)."),
    name: str = typer.Option(..., "--name", help="The site's name, as the coordinator will register it."),
    data: Path = typer.Option(..., "--data", help="The site's data folder (images/ and labels/)."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing key (the coordinator must re-register)."
    ),
) -> None:
    """Create the site's key pair (private key 0600) and its config; print the public key's fingerprint."""
    with user_errors():
        from fedscan.client.daemon import init_site

        cfg, fp = init_site(dir, name, data, force=force)
        out_console.print(
            f"site '{cfg.name}': wrote {cfg.key} (private, stays here) and {cfg.key.with_suffix('.pub')}"
        )
        out_console.print(f"send site.pub to the coordinator; its fingerprint is {fp}")


@site_app.command("start")
def site_start(
    dir: Path = typer.Option(..., "--dir", help="The site folder (from `fedscan site init`)."),
    superlink: str = typer.Option(..., "--superlink", help="The coordinator's SuperLink, HOST:PORT."),
    ca: Path = typer.Option(
        ..., "--ca", help="The federation's CA certificate (ca.crt from the coordinator)."
    ),
    runtime_port: int | None = typer.Option(
        None, "--runtime-port", help="Local port of the SuperNode's runtime API (default 9094)."
    ),
    max_restarts: int | None = typer.Option(
        None, "--max-restarts", help="Give up after this many failures (default: never)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="CPU threads per training process (default: all cores)."
    ),
) -> None:
    """Run this hospital's SuperNode: checks the config and data, then connects out to the coordinator.

    Stays in the foreground (for systemd), restarts after network failures, and exits 3 when
    the coordinator refuses the site's key.
    """
    with user_errors():
        from fedscan.client.daemon import start_site

        code = start_site(
            dir,
            superlink,
            ca,
            runtime_port=runtime_port,
            max_restarts=max_restarts,
            threads=threads,
            on_line=lambda line: out_console.print(line, highlight=False, markup=False),
        )
        raise typer.Exit(code)


@site_app.command("check")
def site_check(
    data: Path = typer.Option(..., "--data", help="The site folder (holding images/ and labels/)."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the report as JSON (no patient data)."
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        min=0,
        max=64,
        help="Processes that read the series (0: one per core, at most 4). "
        "A small site is read in one process.",
    ),
) -> None:
    """Check a site's data before joining: inventory, problems per file, quality profile.

    Reads every DICOM file under images/ (any nesting, any file names), every mask (NIfTI or
    DICOM SEG) and labels/labels.csv, the way training will. Nothing is sent anywhere. The
    JSON holds no names, IDs, dates, UIDs or paths: files with problems are numbered, and
    only this screen shows which path each number is. Exits 1 when no labelled series is usable.
    """
    with user_errors():
        from rich.table import Table

        from fedscan.client.site import check_site_data

        if json_out is not None:
            _check_writable(json_out)  # before a scan that may take long

        progress = Progress(
            TextColumn("[bold]reading series"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        with progress:
            task_id = progress.add_task("series", total=None)
            report, paths = check_site_data(
                data, on_series=lambda k, n: progress.update(task_id, completed=k, total=n), workers=workers
            )
        inv, site = report.inventory, report.site
        out_console.print(
            f"[bold]site {data.name}[/]: {inv.files} files, {inv.image_files_used} image files "
            f"used; {inv.patients} patients, {inv.studies} studies, {inv.series} series, "
            f"{inv.slices} slices; {inv.labelled_series} labelled series"
        )
        for title, counts in (
            ("modalities (series)", inv.modalities),
            ("manufacturers (series)", inv.manufacturers),
            ("transfer syntaxes (slices)", inv.transfer_syntaxes),
        ):
            out_console.print(
                f"  {title}: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"), highlight=False
            )
        out_console.print(
            f"  labels: {inv.nifti_masks} NIfTI masks, {inv.dicom_seg_objects} DICOM SEG "
            f"objects, {inv.label_rows} rows in labels.csv"
        )
        table = Table(title="quality profile per series", show_lines=False)
        for col in (
            "series",
            "modality",
            "slices",
            "size",
            "spacing mm",
            "thick mm",
            "SNR",
            "intensity range",
            "labelled",
            "label source",
            "prevalence",
        ):
            table.add_column(col)
        for p in report.series:
            prevalence = (
                _fmt(p.foreground_slice_fraction, ".2f") + " of slices"
                if p.foreground_slice_fraction is not None
                else ", ".join(f"class {k}: {v}" for k, v in p.class_counts.items()) or "-"
            )
            table.add_row(
                p.id,
                p.modality,
                str(p.slices),
                f"{p.rows}x{p.columns}",
                f"{p.pixel_spacing_mm[0]:.2f}x{p.pixel_spacing_mm[1]:.2f}",
                _fmt(p.slice_thickness_mm),
                _fmt(p.snr),
                f"{_fmt(p.intensity_min, '.0f')}..{_fmt(p.intensity_max, '.0f')}",
                f"{p.labelled_slice_fraction:.0%}",
                p.label_source,
                prevalence,
            )
        out_console.print(table)
        for p in report.series:
            for w in p.warnings:
                out_console.print(f"  [yellow]{p.id}[/]: {w}", highlight=False)
        out_console.print(
            f"[bold]site profile[/]: spacing {_fmt(site.pixel_spacing_mm, '.2f')} mm, thickness "
            f"{_fmt(site.slice_thickness_mm)} mm, SNR {_fmt(site.snr)}, intensities "
            f"{_fmt(site.intensity_min, '.0f')}..{_fmt(site.intensity_max, '.0f')}, labelled slices "
            f"{site.labelled_slice_fraction:.0%}, lesion slices {_fmt(site.foreground_slice_fraction, '.2f')}"
            + (
                ", classes " + ", ".join(f"{k}: {v:.0%}" for k, v in site.class_fractions.items())
                if site.class_fractions
                else ""
            ),
            highlight=False,
        )
        mm = report.mismatches
        out_console.print(
            f"  label mismatches: {mm.series_without_labels} series without labels, "
            f"{mm.masks_not_matching_their_series} masks not matching their series, "
            f"{mm.masks_for_unknown_series} masks for unknown series, "
            f"{mm.label_rows_for_unknown_uids} label rows for unknown UIDs"
        )
        if report.problems:
            out_console.print(f"[bold]{len(report.problems)} problem(s)[/] in {len(paths)} file(s):")
            for prob in report.problems:
                path = paths[prob.file]
                shown = path.relative_to(data) if path.is_relative_to(data) else path
                out_console.print(f"  {prob.file} {shown}: {prob.problem}", highlight=False, markup=False)
        else:
            out_console.print("no problems found")
        if json_out is not None:
            _write_atomic(json_out, report.model_dump_json(indent=2) + "\n")
            out_console.print(f"wrote {json_out}")
        verdict = (
            "[green]ready[/]: labelled series are usable"
            if report.ready
            else "[red]not ready[/]: no labelled series is usable"
        )
        out_console.print(verdict)
        if not report.ready:
            raise typer.Exit(1)


_SITE_DATA = typer.Option(..., "--data", help="The site folder (holding images/ and labels/).")
_MODEL_FILE = typer.Option(
    ..., "--model", help="The run's model file: global_model.pt from its output folder."
)
_SITE_CACHE = typer.Option(
    None,
    "--cache",
    help="The site's cache folder: preprocessed data, and FedBN's local layers (default ~/.cache/fedscan; "
    "a site made with `fedscan site init --dir D` uses D/cache).",
)
_USE_GLOBAL = typer.Option(
    False,
    "--global",
    help="FedBN runs: use the global normalization layers (never trained), not the site's own.",
)
_SITE_DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
_SITE_NAME = typer.Option(
    None,
    "--site",
    help="The site's name in the federation (default: the data folder's name; a deployed site's is in its "
    "site.toml): FedBN finds the site's own layers by it.",
)


def _site_cache(cache: Path | None) -> Path:
    from fedscan.client.site_round import DEFAULT_CACHE

    return cache if cache is not None else DEFAULT_CACHE


def _case_progress(what: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@site_app.command("explain")
def site_explain(
    data: Path = _SITE_DATA,
    model: Path = _MODEL_FILE,
    out: Path = typer.Option(
        ..., "--out", help="Folder to write the explanations into (index.html, explain.json)."
    ),
    n: int = typer.Option(20, "--n", min=1, help="Cases to explain, the most wrong or uncertain first."),
    cache: Path | None = _SITE_CACHE,
    use_global: bool = _USE_GLOBAL,
    device: str = _SITE_DEVICE,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the explanations in an existing --out (other files stay)."
    ),
    site: str | None = _SITE_NAME,
) -> None:
    """Explain the model's predictions on this site's validation data; nothing is sent anywhere.

    Segmentation: predicted masks, an uncertainty map (test-time augmentation) and a confidence per
    lesion. Classification: Grad-CAM and integrated gradients; for exam models, each image's
    attention. Writes OUT/index.html (one self-contained page, the most wrong or uncertain cases
    first), OUT/explain.json and OUT/cases/*.png. They name series by UID: keep them in the hospital.
    """
    with user_errors():
        from fedscan.client.explain import INDEX_HTML, explain_site

        with _case_progress("explaining cases") as progress:
            task_id = progress.add_task("cases", total=None)
            result = explain_site(
                data,
                model,
                out,
                n=n,
                cache_root=_site_cache(cache),
                use_global=use_global,
                device=device,
                overwrite=overwrite,
                site_name=site,
                on_case=lambda k, total: progress.update(task_id, completed=k, total=total),
            )
        scores = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in result.scores.items())
        out_console.print(
            f"site {result.site}: explained {result.shown} of {result.validation_cases} "
            f"validation cases with the {result.weights} {result.model} of round "
            f"{result.round}",
            highlight=False,
        )
        out_console.print(f"  scores: {scores or 'none'}", highlight=False)
        out_console.print(f"wrote {out / INDEX_HTML}", highlight=False)


@site_app.command("predict")
def site_predict(
    data: Path = _SITE_DATA,
    model: Path = _MODEL_FILE,
    out: Path = typer.Option(..., "--out", help="Folder to write the predictions into."),
    cache: Path | None = _SITE_CACHE,
    use_global: bool = _USE_GLOBAL,
    device: str = _SITE_DEVICE,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the predictions in an existing --out (other files stay)."
    ),
    site: str | None = _SITE_NAME,
) -> None:
    """Run the model on every series of this site and write the results for its PACS; nothing is sent.

    Segmentation: one DICOM SEG per series (OUT/seg/<SeriesInstanceUID>.dcm), referencing the source
    images. Classification: OUT/predictions.csv keyed by UIDs. OUT/predict.json summarizes the run.
    """
    with user_errors():
        from fedscan.client.predict import predict_site

        with _case_progress("predicting series") as progress:
            task_id = progress.add_task("series", total=None)
            summary = predict_site(
                data,
                model,
                out,
                cache_root=_site_cache(cache),
                use_global=use_global,
                device=device,
                overwrite=overwrite,
                site_name=site,
                on_series=lambda k, total: progress.update(task_id, completed=k, total=total),
            )
        out_console.print(
            f"site {summary.site}: predicted {summary.series_predicted} of "
            f"{summary.series_found} series ({summary.images_predicted} images) with the "
            f"{summary.kind} {summary.model} of round {summary.server_round} in "
            f"{summary.seconds:.0f} s",
            highlight=False,
        )
        for skipped in summary.skipped_series:
            out_console.print(
                f"  [yellow]not predicted[/]: series {skipped.series_uid} "
                f"({skipped.images} images): {skipped.reason}",
                highlight=False,
            )
        for bad in summary.skipped_files:
            out_console.print(f"  [yellow]file not used[/]: {bad.path}: {bad.reason}", highlight=False)
        out_console.print(f"wrote {len(summary.files_written)} file(s) to {out}", highlight=False)


def _check_writable(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        raise FedscanError(f"cannot write {path}: it is a folder; give a file name such as {path}/check.json")
    if not path.parent.is_dir():
        raise FedscanError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise FedscanError(f"cannot write {path}: folder {path.parent} is not writable")


def _write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    _check_writable(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FedscanError(f"cannot write {path}: {exc.strerror or exc}") from None
