"""Heterogeneous hospitals: fedavg, fedprox and fedbn beside the local-only and pooled baselines.

One command: it writes 4+ synthetic hospitals of the ``heterogeneous`` scenario (a clean
reference site, one with heavy noise, one with another intensity calibration, a small one),
runs ``fedscan simulate`` once per strategy on them with the same seed, split and compute, and
the local-only and pooled baselines once (they do not depend on the strategy). Each strategy's
report gets the baselines' rows in its cross-site matrix, its federated gain per site and the
comparison of all strategies; ``OUT/summary.json`` holds the figures and the two targets:

- the best federated strategy reaches at least 0.98 of the pooled model's mean Dice;
- it beats the local-only model at every site (every federated gain >= 0).

    python bench/heterogeneous.py --out het-bench [--rounds 5 --local-epochs 3 --image-size 64]
        [--strategies fedprox fedavg fedbn fedavgm@server_momentum=0.5] [--set lr_schedule=cosine ...]

The settings with which both targets were met (BENCHMARKS.md):

    python bench/heterogeneous.py --out het-bench --rounds 90 --local-epochs 1 \
        --strategies fedprox fedavg fedbn \
        --set ct_normalization=foreground --set lr_schedule=cosine --set learning_rate=0.003
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402  run from a checkout

from fedscan.common.config import tomllib  # noqa: E402  (the standard library's, or tomli before 3.11)
from fedscan.server.report import write_report_files  # noqa: E402

STRATEGIES = ("fedbn", "fedavg", "fedprox")  # the first one also trains the baselines
# a strategy name with "+quality" runs that strategy with quality weighting; "@KEY=VALUE"
# (repeatable) sets a run-config value for that strategy alone, e.g. fedavgm@server_momentum=0.5


def toml_value(text: str) -> str:
    """A command-line value as TOML: as written when it is a TOML value (numbers, booleans,
    lists), else quoted as a string."""
    try:
        tomllib.loads(f"v = {text}")
        return text
    except tomllib.TOMLDecodeError:
        return json.dumps(text)


# what the script writes into every run's config itself (the flags of this script set them)
OWN_KEYS = frozenset(
    {
        "strategy",
        "rounds",
        "local_epochs",
        "image_size",
        "seed",
        "proximal_mu",
        "cache_dir",
        "model",
        "segnet_width",
        "quality_weighting",
    }
)


def settings(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE pairs as TOML values by key."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            sys.exit(f"not KEY=VALUE with a run-config key: {pair!r}")
        if key in OWN_KEYS:
            sys.exit(f"{key} is set by this script's own flags (see --help), not by KEY=VALUE")
        out[key] = toml_value(value.strip())
    return out


def simulate(data: Path, out: Path, variant: str, args: argparse.Namespace, baselines: bool) -> dict:
    name, *own = variant.split("@")
    strategy, _, extra = name.partition("+")
    config = out.parent / f"{variant}.toml"
    values = {
        "strategy": json.dumps(strategy),
        "rounds": str(args.rounds),
        "local_epochs": str(args.local_epochs),
        "image_size": str(args.image_size),
        "seed": str(args.seed),
        "proximal_mu": str(args.mu),
        "cache_dir": json.dumps(str(out.parent / "cache")),
        "model": json.dumps(args.model),
        "segnet_width": str(args.segnet_width),
        **({"quality_weighting": "true"} if extra == "quality" else {}),
        **settings([*args.set, *own]),
    }
    config.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
    cmd = [
        sys.executable,
        "-m",
        "fedscan.common.cli",
        "simulate",
        "--config",
        str(config),
        "--data-root",
        str(data),
        "--out",
        str(out),
        "--overwrite",
        *(["--baselines"] if baselines else []),
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{variant} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"{variant}: {time.monotonic() - t0:.0f} s", flush=True)
    return json.loads((out / "report.json").read_text())


def federated_row(rep: dict, site: str) -> str:
    return f"personalized:{site}" if rep["strategy"] == "fedbn" else "global"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--mu", type=float, default=0.01, help="FedProx's µ")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--model", default="unet", help="unet or segnet (BatchNorm: FedBN keeps its running statistics local)"
    )
    ap.add_argument("--segnet-width", type=float, default=1.0)
    ap.add_argument(
        "--strategies",
        nargs="+",
        default=list(STRATEGIES),
        help="strategies to compare (the first also trains the baselines); NAME+quality adds quality "
        "weighting, NAME@KEY=VALUE sets a run-config value for that strategy",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config value for every run and the baselines, e.g. lr_schedule=cosine",
    )
    args = ap.parse_args()
    strategies = tuple(args.strategies)
    if "@" in strategies[0]:
        sys.exit(
            f"{strategies[0]}: the first strategy also trains the baselines, so it takes no settings of its "
            "own (list it later, or use --set for every run)"
        )
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = out / "data"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedscan.common.cli",
            "synth",
            "--sites",
            str(args.sites),
            "--scenario",
            "heterogeneous",
            "--seed",
            str(args.seed),
            "--out",
            str(data),
        ],
        check=True,
    )

    reports = {s: simulate(data, out / s, s, args, baselines=(i == 0)) for i, s in enumerate(strategies)}
    base = reports[strategies[0]]
    main_metric = base["metrics"]["main"]
    sites = list(base["sites"])
    baseline_rows = {k: v for k, v in base["cross_site"].items() if k == "pooled" or k.startswith("local:")}

    def score(rep: dict, key: str, site: str) -> float | None:
        return rep["cross_site"].get(key, {}).get(site, {}).get(main_metric)

    comparison = {}
    for name, rep in reports.items():
        rep["cross_site"] = {
            **{k: v for k, v in rep["cross_site"].items() if k not in baseline_rows},
            **baseline_rows,
        }
        rep["baselines"] = base["baselines"]
        comparison[name] = {s: score(rep, federated_row(rep, s), s) for s in sites}
    comparison["local-only"] = {s: score(base, f"local:{s}", s) for s in sites}
    comparison["pooled"] = {s: score(base, "pooled", s) for s in sites}

    def mean(row: dict) -> float:
        vals = [v for v in row.values() if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    for name, rep in reports.items():
        gain = {}
        for s in sites:
            fed, local = comparison[name][s], comparison["local-only"][s]
            gain[s] = None if fed is None or local is None else round(fed - local, 6)
        rep["federated_gain"] = gain
        rep["federated_gain_model"] = {s: federated_row(rep, s) for s in sites}
        rep["strategy_comparison"] = comparison
        write_report_files(out / name, rep)

    best = max(strategies, key=lambda n: mean(comparison[n]))
    pooled_mean = mean(comparison["pooled"])
    summary = {
        "command": " ".join(sys.argv),
        "settings": vars(args) | {"out": str(out)},
        "mean": {n: round(mean(r), 4) for n, r in comparison.items()},
        "per_site": comparison,
        "best": best,
        "best_over_pooled": round(mean(comparison[best]) / pooled_mean, 4),
        "target_098_of_pooled": mean(comparison[best]) >= 0.98 * pooled_mean,
        "best_gain": reports[best]["federated_gain"],
        "target_gain_every_site": all(
            g is not None and g >= 0 for g in reports[best]["federated_gain"].values()
        ),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(n) for n in comparison)
    print(f"{'':{width}}  " + "  ".join(f"{s:>10}" for s in sites) + "        mean")
    for name, row in comparison.items():
        print(
            f"{name:{width}}  "
            + "  ".join(f"{'n/a' if row[s] is None else f'{row[s]:.3f}':>10}" for s in sites)
            + f"  {mean(row):10.3f}"
        )
    print(
        f"best: {best}, {summary['best_over_pooled']:.3f} of pooled (target 0.98: "
        f"{'met' if summary['target_098_of_pooled'] else 'missed'}); gains "
        + ", ".join(f"{s} {g:+.3f}" for s, g in summary["best_gain"].items() if g is not None)
        + f" (every site >= 0: {'met' if summary['target_gain_every_site'] else 'missed'})"
    )
    print(f"reports: {', '.join(str(out / n / 'report.html') for n in strategies)}")


if __name__ == "__main__":
    main()
