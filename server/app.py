"""The Flower ServerApp: builds the strategy from the run config and runs the rounds.

After every round it saves the global model and rewrites the report with each site's
evaluation of that model; the Flower-specific parts stay here, the rest is testable alone.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedscan.common.config import AppConfig
from fedscan.common.models.registry import build_model
from fedscan.common.tasks.registry import task_metrics
from fedscan.common.weights import to_record
from fedscan.server import checkpoint
from fedscan.server.report import RunRecorder
from fedscan.server.strategies import build_strategy

log = logging.getLogger("fedscan.server")

# Prefix of the per-round progress lines; `fedscan simulate` picks them out of the log stream.
PROGRESS_TAG = "[fedscan] "

app = ServerApp()


def _progress(msg: str, *args: object) -> None:
    print(PROGRESS_TAG + (msg % args if args else msg), flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = AppConfig.from_run_config(context.run_config)
    run = cfg.run
    n_sites = len(cfg.site_names) or run.sites
    torch.manual_seed(run.seed)
    model = build_model(run)
    strategy = build_strategy(run, n_sites)
    _, main_metric = task_metrics(run.task)
    recorder = RunRecorder(run.output, cfg)
    checkpoint.save_run_config(run.output, run)
    recorder.write("running")
    _progress("run started: %d sites, %d rounds", n_sites, run.rounds)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        checkpoint.save_round(run.output, server_round, arrays, run)
        summary = recorder.record_round(server_round, strategy.site_history.get(server_round, {}))
        recorder.write("running")
        per_site = ", ".join(
            f"{s} {r[main_metric]:.3f}" if r.get(main_metric) is not None else f"{s} n/a"
            for s, r in summary["per_site"].items()
        )
        mean = summary["mean"][main_metric]
        missing = recorder.history[-1].get("missing_sites")
        if missing:
            _progress("round %d: no evaluation from %s", server_round, ", ".join(missing))
        _progress("round %d/%d done: mean %s %s (%s)", server_round, run.rounds, main_metric,
                  "n/a" if mean is None else f"{mean:.3f}", per_site)
        return None

    round_config = ConfigRecord(
        {"local-epochs": run.local_epochs, "lr": run.learning_rate, "batch-size": run.batch_size}
    )
    try:
        strategy.start(
            grid=grid,
            initial_arrays=to_record(model),
            num_rounds=run.rounds,
            train_config=round_config,
            evaluate_config=ConfigRecord(),
            evaluate_fn=after_round,
        )
    except BaseException:
        recorder.write("failed")
        _progress("run failed")
        raise
    rep = recorder.write("complete")
    _progress("run complete: final mean %s %s", main_metric, rep["final"]["mean"].get(main_metric))
