"""The `fedscan` command. Problems a user can fix are printed plainly, without a traceback."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedscan.common import __version__
from fedscan.common.config import MODELS, STRATEGIES, TASKS, load_run_config, read_toml
from fedscan.common.errors import FedscanError

if TYPE_CHECKING:
    from fedscan.common.run_events import RunEvent

console = Console(stderr=True)
out_console = Console()

app = typer.Typer(
    name="fedscan",
    help=(
        "fedscan trains one medical-imaging model across hospitals without moving any images.\n\n"
        "Each hospital keeps its DICOM data on its own machine and trains locally; only model "
        "weight updates leave the site. A coordinator combines them and sends the improved "
        "model back, and every hospital sees how the shared model performs on its own data.\n\n"
        "Start with `fedscan simulate` to try a whole federation on this machine, on built-in "
        "synthetic hospitals. Nothing here contacts the internet."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so every started process is stopped


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a FedscanError as a plain message and exit 2; Ctrl-C or SIGTERM exits 130."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except FedscanError as exc:
        console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            console.print(f"  [dim]hint:[/] {exc.hint}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopped everything that was started[/]")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        out_console.print(f"fedscan {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug messages."),
) -> None:
    _setup_logging(verbose)


@app.command()
def synth(
    sites: int = typer.Option(3, "--sites", help="Number of hospitals to create."),
    out: Path = typer.Option(..., "--out", help="Folder to write the hospitals into."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same files."),
    task: str = typer.Option("segmentation", "--task", help="segmentation (masks) or classification (labels.csv)."),
    label_level: str = typer.Option("exam", "--label-level",
                                    help="Classification: label whole exams (exam) or single images (image)."),
    scenario: str = typer.Option("default", "--scenario",
                                 help="default, or heterogeneous (at least 4 sites: a clean one, heavy noise, "
                                      "another intensity calibration, a small one)."),
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
            manifest = synthesize(out, sites, seed, overwrite=overwrite, task=task.strip().lower(),
                                  label_level=label_level.strip().lower(), scenario=scenario.strip().lower(),
                                  on_site=lambda name: status.update(f"writing {name}"))
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


# Options `simulate` and `run` share: one definition each.
_CONFIG = typer.Option(None, "--config", help="Run configuration (TOML).")
_ROUNDS = typer.Option(None, "--rounds", help="Federated rounds.")
_SEED = typer.Option(None, "--seed", help="Random seed.")
_TASK = typer.Option(None, "--task", help=f"One of: {', '.join(TASKS)}.")
_MODEL = typer.Option(None, "--model", help=f"One of: {', '.join(MODELS)}.")
_STRATEGY = typer.Option(None, "--strategy", help=f"One of: {', '.join(STRATEGIES)}.")
_LOCAL_EPOCHS = typer.Option(None, "--local-epochs", help="Local epochs per round (0: no training, to time the protocol).")
_LR = typer.Option(None, "--lr", help="Learning rate.")
_BATCH_SIZE = typer.Option(None, "--batch-size", help="Batch size.")
_IMAGE_SIZE = typer.Option(None, "--image-size", help="Image side in pixels (multiple of 16).")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in --out.")


@app.command()
def simulate(
    config: Path | None = _CONFIG,
    sites: int | None = typer.Option(None, "--sites", help="Synthetic hospitals to create when no --data-root is given."),
    rounds: int | None = _ROUNDS,
    data_root: Path | None = typer.Option(None, "--data-root", help="Folder holding one folder per site."),
    out: Path | None = typer.Option(None, "--out", help="Output folder for reports and weights."),
    seed: int | None = _SEED,
    task: str | None = _TASK,
    model: str | None = _MODEL,
    strategy: str | None = _STRATEGY,
    local_epochs: int | None = _LOCAL_EPOCHS,
    learning_rate: float | None = _LR,
    batch_size: int | None = _BATCH_SIZE,
    image_size: int | None = _IMAGE_SIZE,
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    secagg: bool | None = typer.Option(None, "--secagg/--no-secagg",
                                       help="Secure aggregation (SecAgg+): the server learns only the sum. Default: off."),
    baselines: bool = typer.Option(False, "--baselines",
                                   help="Also train each site alone and all data pooled, at the same compute, and "
                                        "evaluate every model at every site (cross-site matrix, federated gain)."),
    overwrite: bool = _OVERWRITE,
    resume: Path | None = typer.Option(
        None, "--resume", metavar="OUT",
        help="Continue the stopped run in the output folder OUT after its last completed round, with the "
             "settings it was started with (OUT/run_config.toml).",
    ),
) -> None:
    """Simulate a federation of hospitals on this machine and report results per site.

    Without --data-root it first creates --sites synthetic hospitals. Writes report.json,
    per_site.csv, report.md, the final global weights and the resolved config into --out.
    With --resume OUT it continues a stopped run from its last checkpoint instead.
    """
    with user_errors():
        overrides: dict[str, Any] = {
            "sites": sites, "rounds": rounds, "data_root": data_root, "output": out, "seed": seed,
            "task": task, "model": model, "strategy": strategy, "local_epochs": local_epochs,
            "learning_rate": learning_rate, "batch_size": batch_size, "image_size": image_size,
            "device": device, "secagg": secagg,
        }
        if resume is not None:
            given = [k for k, v in {**overrides, "config": config, "overwrite": overwrite or None}.items()
                     if v is not None]
            _resume(resume, given, baselines)
            return
        cfg = load_run_config(config, overrides)
        from fedscan.server.simulate import run_simulation

        def on_stage(line: str) -> None:
            console.print(f"[dim]{line}[/]", highlight=False)

        with _round_progress(cfg.rounds) as on_event:
            report = run_simulation(cfg, overwrite=overwrite, on_event=on_event, on_stage=on_stage,
                                    baselines=baselines)
        _print_result(report, Path(cfg.output))


# how `simulate` spells the options behind these settings, where it differs from the setting
_FLAGS = {"output": "--out", "learning_rate": "--lr", "secagg": "--secagg/--no-secagg"}


def _resume(out: Path, given: list[str], baselines: bool) -> None:
    """`fedscan simulate --resume OUT`: the run's own settings only, so that it ends as it would have."""
    if given:
        flags = ", ".join(_FLAGS.get(k, "--" + k.replace("_", "-")) for k in given)
        raise FedscanError(
            f"--resume continues a run with the settings it was started with; it takes no other options (got {flags})",
            hint=f"drop them, or start a new run; the run's settings are in {out / 'run_config.toml'}",
        )
    from fedscan.server.simulate import find_resume, run_simulation

    cfg, ckpt, done = find_resume(out)
    console.print(f"[dim]resuming the run in {cfg.output} after round {done} of {cfg.rounds} ({ckpt.name})[/]",
                  highlight=False)
    with _round_progress(cfg.rounds, done) as on_event:
        report = run_simulation(cfg, on_event=on_event, baselines=baselines, resume_from=ckpt,
                                on_stage=lambda line: console.print(f"[dim]{line}[/]", highlight=False))
    _print_result(report, Path(cfg.output))


@contextmanager
def _round_progress(rounds: int, done: int = 0) -> Iterator[Callable[[RunEvent], None]]:
    """A progress bar over the rounds (``done`` of them before it starts), fed with the
    ServerApp's run events; each event's text is printed above it."""
    from fedscan.common.run_events import RoundFinished

    progress = Progress(
        TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    )
    task_id = progress.add_task("rounds", total=rounds, completed=done)

    def on_event(event: RunEvent) -> None:
        text = event.text()
        if text is None:
            return
        if not progress.live.is_started:
            progress.start()  # the bar appears once Flower runs the first round
        progress.console.print(f"  {text}", highlight=False)
        if isinstance(event, RoundFinished):
            progress.update(task_id, completed=event.round)

    try:
        yield on_event
    finally:
        progress.stop()


def _print_result(report: dict[str, Any], out: Path) -> None:
    final = report["final"]
    out_dir = out.expanduser().resolve()
    out_console.print((out_dir / "report.md").read_text(), highlight=False)
    main = report["metrics"]["main"]
    mean = final["mean"].get(main)
    out_console.print(
        f"mean {main} over {len(final['per_site'])} sites: "
        f"{'n/a' if mean is None else f'{mean:.3f}'}; results in {out_dir}"
    )


@app.command("run")
def run_cmd(
    superlink: str = typer.Option(..., "--superlink", help="The coordinator's SuperLink, HOST:PORT."),
    ca: Path = typer.Option(..., "--ca", help="The federation's CA certificate (ca.crt from `fedscan server init`)."),
    config: Path | None = _CONFIG,
    sites: int | None = typer.Option(None, "--sites", help="Registered sites to wait for before round 1."),
    rounds: int | None = _ROUNDS,
    out: Path | None = typer.Option(None, "--out", help="Output folder for the reports."),
    seed: int | None = _SEED,
    task: str | None = _TASK,
    model: str | None = _MODEL,
    strategy: str | None = _STRATEGY,
    local_epochs: int | None = _LOCAL_EPOCHS,
    learning_rate: float | None = _LR,
    batch_size: int | None = _BATCH_SIZE,
    image_size: int | None = _IMAGE_SIZE,
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda (at each site)."),
    wait_timeout: float | None = typer.Option(None, "--wait-timeout",
                                              help="Seconds to wait for the sites a round needs (default 600)."),
    round_timeout: float | None = typer.Option(None, "--round-timeout",
                                               help="Seconds a round waits for the sites' replies (default 3600)."),
    secagg: bool | None = typer.Option(None, "--secagg/--no-secagg",
                                       help="Secure aggregation (SecAgg+). Default: on in deployment."),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Run a federation on a live SuperLink: the coordinator's command.

    Waits for --sites registered sites (up to --wait-timeout), trains for --rounds rounds,
    streams progress per round, and writes report.json, per_site.csv and report.md into --out.
    """
    with user_errors():
        overrides: dict[str, Any] = {
            "sites": sites, "rounds": rounds, "output": out, "seed": seed, "task": task, "model": model,
            "strategy": strategy, "local_epochs": local_epochs, "learning_rate": learning_rate,
            "batch_size": batch_size, "image_size": image_size, "device": device,
            "wait_timeout": wait_timeout, "round_timeout": round_timeout, "secagg": secagg,
        }
        if secagg is None and not (config and "secagg" in read_toml(config)):
            overrides["secagg"] = True  # deployment: on unless the config or --no-secagg says otherwise
        cfg = load_run_config(config, overrides)
        from fedscan.server.coordinator import run_deployment

        with _round_progress(cfg.rounds) as on_event:
            report = run_deployment(cfg, superlink, ca, overwrite=overwrite, on_event=on_event,
                                    on_stage=lambda line: console.print(f"  {line}", highlight=False))
        _print_result(report, Path(cfg.output))


@app.command("report")
def report_cmd(
    out: Path = typer.Argument(..., help="A run's output folder, holding its report.json."),
) -> None:
    """Rebuild a run's report files from its report.json.

    Rewrites report.md, per_site.csv, report.html (one self-contained page, figures
    embedded) and the figures in OUT/figures from OUT/report.json; report.json is not changed.
    """
    with user_errors():
        from fedscan.server.report import regenerate_report

        for path in regenerate_report(out):
            out_console.print(f"wrote {path}", highlight=False)


server_app = typer.Typer(
    name="server", help="Commands the coordinator runs: certificates, the SuperLink, site registration.",
    no_args_is_help=True, rich_markup_mode="markdown",
)
app.add_typer(server_app, name="server")


@server_app.command("init")
def server_init(
    dir: Path = typer.Option(..., "--dir", help="The coordinator folder to create."),
    host: list[str] = typer.Option(..., "--host", help="DNS name or IP sites use to reach the server (repeat)."),
    port: int = typer.Option(9092, "--port", help="The SuperLink's port (the one port sites connect to)."),
    force: bool = typer.Option(False, "--force", help="Replace existing keys (sites then need the new ca.crt)."),
) -> None:
    """Create the federation's CA and the SuperLink's TLS certificate (keys written 0600)."""
    with user_errors():
        from fedscan.server.coordinator import init_server

        p = init_server(dir, host, port=port, force=force)
        out_console.print(f"wrote the CA ({p['ca_crt']}) and the SuperLink certificate for "
                          f"{', '.join(host)} into {dir}")
        out_console.print(f"give every site {p['ca_crt']}; keep {p['ca_key']} private (offline if you can)")


@server_app.command("start")
def server_start(
    dir: Path = typer.Option(..., "--dir", help="The coordinator folder."),
    port: int | None = typer.Option(None, "--port", help="Port to listen on (default: from server init)."),
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default 0.0.0.0)."),
) -> None:
    """Run the SuperLink: TLS, site authentication, persistent state, no runtime installs."""
    with user_errors():
        from fedscan.server.coordinator import start_server

        code = start_server(dir, host, port, on_line=lambda line: out_console.print(line, highlight=False,
                                                                                    markup=False))
        raise typer.Exit(code)


@server_app.command("add-site")
def server_add_site(
    public_key: Path = typer.Argument(..., help="The site's site.pub (from `fedscan site init`)."),
    dir: Path = typer.Option(..., "--dir", help="The coordinator folder."),
    name: str = typer.Option(..., "--name", help="The site's name."),
) -> None:
    """Register a hospital's public key; only registered sites may connect."""
    with user_errors():
        from fedscan.server.coordinator import add_site

        entry = add_site(dir, name, public_key)
        out_console.print(f"registered site '{name}' (node {entry['node_id']}, key {entry['fingerprint']})")
        out_console.print("check the fingerprint with the site's IT out of band (phone, not the same e-mail)")


@server_app.command("remove-site")
def server_remove_site(
    dir: Path = typer.Option(..., "--dir", help="The coordinator folder."),
    name: str = typer.Option(..., "--name", help="The site to remove."),
) -> None:
    """Unregister a site: its key is refused from now on."""
    with user_errors():
        from fedscan.server.coordinator import remove_site

        remove_site(dir, name)
        out_console.print(f"removed site '{name}': its key is refused from now on")


@server_app.command("sites")
def server_sites(dir: Path = typer.Option(..., "--dir", help="The coordinator folder.")) -> None:
    """List the registered sites and whether they are online."""
    with user_errors():
        from rich.table import Table

        from fedscan.server.coordinator import list_sites

        rows = list_sites(dir)
        table = Table(title=f"{len(rows)} registered site(s)")
        for col in ("site", "status", "online since", "key fingerprint", "node id"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], r["status"], r["online_at"], r["fingerprint"], r["node_id"])
        out_console.print(table)


site_app = typer.Typer(
    name="site", help="Commands a hospital runs on its own machine.", no_args_is_help=True,
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
    force: bool = typer.Option(False, "--force", help="Replace an existing key (the coordinator must re-register)."),
) -> None:
    """Create the site's key pair (private key 0600) and its config; print the public key's fingerprint."""
    with user_errors():
        from fedscan.client.daemon import init_site

        cfg, fp = init_site(dir, name, data, force=force)
        out_console.print(f"site '{cfg.name}': wrote {cfg.key} (private, stays here) and {cfg.key.with_suffix('.pub')}")
        out_console.print(f"send site.pub to the coordinator; its fingerprint is {fp}")


@site_app.command("start")
def site_start(
    dir: Path = typer.Option(..., "--dir", help="The site folder (from `fedscan site init`)."),
    superlink: str = typer.Option(..., "--superlink", help="The coordinator's SuperLink, HOST:PORT."),
    ca: Path = typer.Option(..., "--ca", help="The federation's CA certificate (ca.crt from the coordinator)."),
    runtime_port: int | None = typer.Option(None, "--runtime-port",
                                            help="Local port of the SuperNode's runtime API (default 9094)."),
    max_restarts: int | None = typer.Option(None, "--max-restarts",
                                            help="Give up after this many failures (default: never)."),
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="CPU threads per training process (default: all cores)."),
) -> None:
    """Run this hospital's SuperNode: checks the config and data, then connects out to the coordinator.

    Stays in the foreground (for systemd), restarts after network failures, and exits 3 when
    the coordinator refuses the site's key.
    """
    with user_errors():
        from fedscan.client.daemon import start_site

        code = start_site(dir, superlink, ca, runtime_port=runtime_port, max_restarts=max_restarts, threads=threads,
                          on_line=lambda line: out_console.print(line, highlight=False, markup=False))
        raise typer.Exit(code)


@site_app.command("check")
def site_check(
    data: Path = typer.Option(..., "--data", help="The site folder (holding images/ and labels/)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON (no patient data)."),
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

        progress = Progress(TextColumn("[bold]reading series"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        with progress:
            task_id = progress.add_task("series", total=None)
            report, paths = check_site_data(
                data, on_series=lambda k, n: progress.update(task_id, completed=k, total=n))
        inv, site = report.inventory, report.site
        out_console.print(f"[bold]site {data.name}[/]: {inv.files} files, {inv.image_files_used} image files "
                          f"used; {inv.patients} patients, {inv.studies} studies, {inv.series} series, "
                          f"{inv.slices} slices; {inv.labelled_series} labelled series")
        for title, counts in (("modalities (series)", inv.modalities), ("manufacturers (series)", inv.manufacturers),
                              ("transfer syntaxes (slices)", inv.transfer_syntaxes)):
            out_console.print(f"  {title}: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"),
                              highlight=False)
        out_console.print(f"  labels: {inv.nifti_masks} NIfTI masks, {inv.dicom_seg_objects} DICOM SEG objects, "
                          f"{inv.label_rows} rows in labels.csv")
        table = Table(title="quality profile per series", show_lines=False)
        for col in ("series", "modality", "slices", "size", "spacing mm", "thick mm", "SNR", "intensity range",
                    "labelled", "label source", "prevalence"):
            table.add_column(col)
        for p in report.series:
            prevalence = (_fmt(p.foreground_slice_fraction, ".2f") + " of slices"
                          if p.foreground_slice_fraction is not None
                          else ", ".join(f"class {k}: {v}" for k, v in p.class_counts.items()) or "-")
            table.add_row(p.id, p.modality, str(p.slices), f"{p.rows}x{p.columns}",
                          f"{p.pixel_spacing_mm[0]:.2f}x{p.pixel_spacing_mm[1]:.2f}", _fmt(p.slice_thickness_mm),
                          _fmt(p.snr), f"{_fmt(p.intensity_min, '.0f')}..{_fmt(p.intensity_max, '.0f')}",
                          f"{p.labelled_slice_fraction:.0%}", p.label_source, prevalence)
        out_console.print(table)
        for p in report.series:
            for w in p.warnings:
                out_console.print(f"  [yellow]{p.id}[/]: {w}", highlight=False)
        out_console.print(
            f"[bold]site profile[/]: spacing {_fmt(site.pixel_spacing_mm, '.2f')} mm, thickness "
            f"{_fmt(site.slice_thickness_mm)} mm, SNR {_fmt(site.snr)}, intensities "
            f"{_fmt(site.intensity_min, '.0f')}..{_fmt(site.intensity_max, '.0f')}, labelled slices "
            f"{site.labelled_slice_fraction:.0%}, lesion slices {_fmt(site.foreground_slice_fraction, '.2f')}"
            + (", classes " + ", ".join(f"{k}: {v:.0%}" for k, v in site.class_fractions.items())
               if site.class_fractions else ""), highlight=False)
        mm = report.mismatches
        out_console.print(f"  label mismatches: {mm.series_without_labels} series without labels, "
                          f"{mm.masks_not_matching_their_series} masks not matching their series, "
                          f"{mm.masks_for_unknown_series} masks for unknown series, "
                          f"{mm.label_rows_for_unknown_uids} label rows for unknown UIDs")
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
        verdict = "[green]ready[/]: labelled series are usable" if report.ready else \
            "[red]not ready[/]: no labelled series is usable"
        out_console.print(verdict)
        if not report.ready:
            raise typer.Exit(1)


_SITE_DATA = typer.Option(..., "--data", help="The site folder (holding images/ and labels/).")
_MODEL_FILE = typer.Option(..., "--model", help="The run's model file: global_model.pt from its output folder.")
_SITE_CACHE = typer.Option(
    None, "--cache",
    help="The site's cache folder: preprocessed data, and FedBN's local layers (default ~/.cache/fedscan; "
         "a site made with `fedscan site init --dir D` uses D/cache).",
)
_USE_GLOBAL = typer.Option(False, "--global",
                           help="FedBN runs: use the global normalization layers (never trained), not the site's own.")
_SITE_DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
_SITE_NAME = typer.Option(None, "--site",
                          help="The site's name in the federation (default: the data folder's name; a deployed "
                               "site's is in its site.toml): FedBN finds the site's own layers by it.")


def _site_cache(cache: Path | None) -> Path:
    from fedscan.client.site_round import DEFAULT_CACHE

    return cache if cache is not None else DEFAULT_CACHE


def _case_progress(what: str) -> Progress:
    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


@site_app.command("explain")
def site_explain(
    data: Path = _SITE_DATA,
    model: Path = _MODEL_FILE,
    out: Path = typer.Option(..., "--out", help="Folder to write the explanations into (index.html, explain.json)."),
    n: int = typer.Option(20, "--n", min=1, help="Cases to explain, the most wrong or uncertain first."),
    cache: Path | None = _SITE_CACHE,
    use_global: bool = _USE_GLOBAL,
    device: str = _SITE_DEVICE,
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the explanations in an existing --out (other files stay)."),
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
            result = explain_site(data, model, out, n=n, cache_root=_site_cache(cache), use_global=use_global,
                                  device=device, overwrite=overwrite, site_name=site,
                                  on_case=lambda k, total: progress.update(task_id, completed=k, total=total))
        scores = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in result.scores.items())
        out_console.print(f"site {result.site}: explained {result.shown} of {result.validation_cases} validation "
                          f"cases with the {result.weights} {result.model} of round {result.round}", highlight=False)
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
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the predictions in an existing --out (other files stay)."),
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
            summary = predict_site(data, model, out, cache_root=_site_cache(cache), use_global=use_global,
                                   device=device, overwrite=overwrite, site_name=site,
                                   on_series=lambda k, total: progress.update(task_id, completed=k, total=total))
        out_console.print(f"site {summary.site}: predicted {summary.series_predicted} of {summary.series_found} series "
                          f"({summary.images_predicted} images) with the {summary.kind} {summary.model} of round "
                          f"{summary.server_round} in {summary.seconds:.0f} s", highlight=False)
        for skipped in summary.skipped_series:
            out_console.print(f"  [yellow]not predicted[/]: series {skipped.series_uid} ({skipped.images} images): "
                              f"{skipped.reason}", highlight=False)
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


def main() -> None:
    """Entry point of the `fedscan` console script."""
    app()


if __name__ == "__main__":
    main()
