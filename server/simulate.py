"""`fedscan simulate`: a whole federation on one machine, on Flower's simulation engine.

The launcher owns the Flower runtime it uses. It starts a private ``flower-superlink
--simulation`` (Ray backend) on free loopback ports with a per-run FLWR_HOME, telemetry,
update checks and runtime dependency installation off; submits the app with ``flwr run``;
follows the ServerApp's run events (``fedscan.common.run_events``) through ``flwr log
--stream``; and stops every process it started, also on failure or Ctrl-C. A stale SuperLink
on Flower's default ports is neither reused nor disturbed.

Before Flower starts, every site is checked and its DICOM preprocessed into the local
cache, so bad input fails fast with a message that names the site.

`fedscan simulate --resume OUT` (:func:`find_resume`, then :func:`run_simulation` with
``resume_from``) continues a stopped run in its output folder after its last checkpoint, with
the run config it saved, to the same result as a run that never stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from fedscan.common.config import EXAM_MODELS, AppConfig, RunConfig
from fedscan.common.data.layout import SiteDir, check_site, discover_sites
from fedscan.common.data.synthetic import synthesize
from fedscan.common.errors import FedscanError
from fedscan.common.flower_runtime import (
    FlowerProcess,
    flower_exe,
    follow_run,
    free_port,
    offline_env,
    submit_run,
    write_app_dir,
)
from fedscan.common.run_events import RunEvent
from fedscan.server.checkpoint import RUN_CONFIG, find_resume_point
from fedscan.server.report import (
    FIGURES_DIR,
    PER_SITE_CSV,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    write_report_files,
)

log = logging.getLogger("fedscan.simulate")

OUTPUT_NAMES = (
    REPORT_JSON,
    PER_SITE_CSV,
    REPORT_MD,
    REPORT_HTML,
    FIGURES_DIR,
    "global_model.pt",
    "run_config.toml",
    "checkpoints",
)
CONNECTION = "fedscan-sim"


class LocalSuperLink:
    """A private simulation SuperLink for one run; a context manager that always cleans up."""

    def __init__(self, home: Path, log_file: Path, startup_timeout: float = 60.0) -> None:
        self.home = home
        self.log_file = log_file
        self.startup_timeout = startup_timeout
        self.port = 0
        self.process: FlowerProcess | None = None
        # seconds its processes get to exit on SIGTERM before SIGKILL: see `run_finished`
        self.grace = 15.0

    def __enter__(self) -> LocalSuperLink:
        self.port = free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [
            flower_exe("flower-superlink"),
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
        ]
        self.process = FlowerProcess(cmd, offline_env(self.home), self.log_file)
        try:
            self.process.__enter__()
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise FedscanError(
                    f"the Flower SuperLink exited at start (code {code})", hint=f"see {self.log_file}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise FedscanError(
            f"the Flower SuperLink did not become ready within {self.startup_timeout:.0f}s",
            hint=f"see {self.log_file}",
        )

    def write_connection(self) -> None:
        """Write FLWR_HOME/config.toml so that `flwr run ... fedscan-sim` reaches this link."""
        conf = {
            "superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": f"127.0.0.1:{self.port}", "insecure": True},
            }
        }
        (self.home / "config.toml").write_text(tomli_w.dumps(conf))

    def run_finished(self) -> None:
        """The ServerApp has finished and written everything: what is left of Flower's run (the
        simulation engine's Ray shutdown) is not waited for. Stopped gracefully, the SuperLink's
        processes took 5.1-5.5 s to exit after the run's last event on 2 cores; with 1 s of grace
        before SIGKILL, 2.5 s. Nothing of theirs outlives the run: its Flower home is a temporary
        folder."""
        self.grace = 1.0

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.stop(self.grace)
            self.process.__exit__(None, None, None)
            self.process = None


def check_output(out: Path, overwrite: bool) -> list[str]:
    """Refuse to mix two runs' results in one folder unless --overwrite is given.

    Returns the earlier results that ``clear_output`` will remove.
    """
    existing = [n for n in OUTPUT_NAMES if (out / n).exists()]
    if existing and not overwrite:
        raise FedscanError(
            f"output folder {out} already holds results of a run ({', '.join(existing)})",
            hint="choose a new --out, or pass --overwrite to replace them",
        )
    return existing


def clear_output(out: Path, existing: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def resolve_sites(cfg: RunConfig, out: Path, say: Callable[[str], None]) -> tuple[Path, list[SiteDir]]:
    """The data root (synthesizing hospitals when none is given) and its checked sites."""
    if cfg.data_root is None:
        data_root = out / "data"
        # exam classifiers get exam labels; image classifiers get a label per image
        level = "exam" if cfg.model in EXAM_MODELS else "image"
        what = f"{cfg.task}, {level} labels" if cfg.task == "classification" else cfg.task
        say(f"synthesizing {cfg.sites} hospitals ({what}, seed {cfg.seed}) into {data_root}")
        synthesize(data_root, cfg.sites, cfg.seed, overwrite=True, task=cfg.task, label_level=level)
    else:
        data_root = Path(cfg.data_root).expanduser().resolve()
    sites = discover_sites(data_root)
    for site in sites:
        check_site(site, cfg.task)
    return data_root, sites


def client_resources(cfg: RunConfig, n_sites: int) -> dict[str, Any]:
    """Ray resources per simulated site: one CPU each; a share of the GPU when there is one."""
    import torch

    gpu = cfg.device != "cpu" and torch.cuda.is_available()
    return {
        "num-supernodes": n_sites,
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": round(1.0 / min(n_sites, 4), 3) if gpu else 0.0,
    }


def _federation_config(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def run_simulation(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    on_event: Callable[[RunEvent], None] | None = None,
    on_stage: Callable[[str], None] = print,
    baselines: bool = False,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Run a simulated federation; return report.json's content. Raises FedscanError.

    ``on_event`` gets the ServerApp's run events (``fedscan.common.run_events``), ``on_stage``
    the launcher's own steps (checking the sites, starting Flower). With ``baselines``, also
    train the local-only and pooled baselines and evaluate every model at every site
    (``fedscan.server.baselines``). With ``resume_from`` (a round's checkpoint in ``cfg.output``,
    see :func:`find_resume`), continue that run in its folder instead of starting one."""
    say = on_stage
    out = Path(cfg.output).expanduser().resolve()
    # a resumed run keeps its folder
    earlier = [] if resume_from is not None else check_output(out, overwrite)
    data_root, sites = resolve_sites(cfg, out, say)
    if cfg.fault_site is not None and cfg.fault_site not in {s.name for s in sites}:
        names = ", ".join(s.name for s in sites)
        raise FedscanError(f"fault_site '{cfg.fault_site}' is none of the sites: {names}")
    cache_dir = Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else out / "cache"
    run = cfg.model_copy(update={"data_root": data_root, "output": out, "cache_dir": cache_dir})

    # Decode and preprocess every site now: bad data fails here, naming the site, before any
    # earlier result is replaced.
    from fedscan.common.tasks.local_training import open_site  # torch import kept off the CLI's fast path

    local_sites = []
    for site in sites:
        say(f"checking and preprocessing site '{site.name}'")
        local = open_site(site, run, cache_dir)
        say(f"  {site.name}: {local.describe()}")
        local_sites.append(local)
    clear_output(out, earlier)

    app_cfg = AppConfig(run=run, site_names=[s.name for s in sites], resume_from=resume_from)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedscan-flwr-") as tmp:
        tmp_path = Path(tmp)
        app_dir = write_app_dir(tmp_path / "app")
        overrides = tmp_path / "run-config.toml"
        overrides.write_text(tomli_w.dumps(app_cfg.to_run_config()))
        home = tmp_path / "flwr-home"
        say(f"starting Flower's simulation engine for {len(sites)} sites")
        try:
            with LocalSuperLink(home, logs / "superlink.log") as link:
                link.write_connection()
                flower_log = logs / "flower.log"
                run_id = submit_run(
                    app_dir,
                    CONNECTION,
                    home,
                    overrides,
                    flower_log,
                    federation_config=_federation_config(client_resources(run, len(sites))),
                    hint=f"see {flower_log} and {link.log_file}",
                )
                # Followed until the ServerApp's RunFinished, not until Flower's run ends: leaving the
                # SuperLink's block then stops the simulation engine at once instead of waiting for
                # its graceful Ray shutdown (see LocalSuperLink.run_finished).
                on_run_event = on_event or (lambda event: None)
                follow_run(run_id, CONNECTION, home, flower_log, on_run_event, until_finished=True)
                link.run_finished()
        except KeyboardInterrupt:
            _mark_unfinished(out, "interrupted")
            raise
        except BaseException:
            _mark_unfinished(out, "failed")
            raise
    _mark_unfinished(out, "failed")  # a ServerApp that died cannot have said so itself

    report_path = out / REPORT_JSON
    if not report_path.is_file():
        raise FedscanError("the federated run ended without a report", hint=f"see {logs / 'flower.log'}")
    report = json.loads(report_path.read_text())
    if report.get("status") != "complete":
        raise FedscanError(
            f"the federated run did not complete ({report.get('rounds_completed', 0)} of "
            f"{report.get('rounds')} rounds); partial results are in {out}",
            hint=f"see {logs / 'flower.log'}",
        )
    return compare_sites(run, out, local_sites, report, baselines, say)


def compare_sites(
    run: RunConfig,
    out: Path,
    sites: list,
    report: dict[str, Any],
    baselines: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Add to a finished run's report each site's quality summary and the cross-site matrix: from
    the federated evaluation alone, or with ``baselines`` every model on every site. Rewrites
    the report files."""
    from fedscan.server import baselines as bl
    from fedscan.server.report import write_report_files

    names = [s.name for s in sites]
    main = report["metrics"]["main"]
    report["quality"] = bl.quality_summary(run, sites, report)
    final = report["final"]["per_site"]
    if baselines:
        models = bl.federated_models(run, out, names)
        trained, report["baselines"] = bl.run_baselines(run, sites, say)
        models.update(trained)
        matrix = bl.cross_site_matrix(models, sites, run, say)
        report["cross_site"] = matrix
        report["federated_gain"], report["federated_gain_model"] = bl.federated_gain(
            matrix, names, main, run.strategy == "fedbn"
        )
        worse = [s for s, g in report["federated_gain"].items() if g is not None and g < 0]
        for s in worse:
            say(
                f"warning: at {s} the federated model is worse than {s}'s local-only model "
                f"({main} {report['federated_gain'][s]:+.3f})"
            )
    else:  # the federated evaluation: the global model at every site (FedBN: each site's own model)
        key = "global" if run.strategy != "fedbn" else None
        metrics = set(report["metrics"]["names"]) | {"loss"}
        rows = {s: {k: v for k, v in r.items() if k in metrics} for s, r in final.items()}
        report["cross_site"] = {key: rows} if key else {f"personalized:{s}": {s: r} for s, r in rows.items()}
    write_report_files(out, report)
    return report


def find_resume(out: Path) -> tuple[RunConfig, Path, int]:
    """The run config saved in ``out``, its last checkpoint and that checkpoint's round, checked:
    a FedscanError when there is no run, no checkpoint, nothing left to run, or its data is gone."""
    cfg, ckpt, resumed = find_resume_point(out, "fedscan simulate")
    out = Path(cfg.output)
    data_root = Path(cfg.data_root) if cfg.data_root is not None else None
    if data_root is None or not data_root.is_dir():
        raise FedscanError(
            f"cannot resume the run in {out}: its data_root {data_root} is missing",
            hint=f"put the sites back where {out / RUN_CONFIG} says they are",
        )
    known = {s for h in resumed.history for s in (*h["per_site"], *h.get("missing_sites", []))}
    found = {site.name for site in discover_sites(data_root)}
    if known and found != known:
        raise FedscanError(
            f"cannot resume the run in {out}: {data_root} holds the sites {sorted(found)}, "
            f"the run had {sorted(known)}",
            hint="resume with the sites the run started with",
        )
    return cfg, ckpt, resumed.server_round


def _mark_unfinished(out: Path, status: str) -> None:
    """Record in report.json that a run stopped before the ServerApp could finish it."""
    path = out / REPORT_JSON
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if report.get("status") == "running":
        report["status"] = status
        write_report_files(out, report)
