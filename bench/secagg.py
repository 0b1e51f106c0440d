"""Benchmark: round wall time with SecAgg+ against plaintext FedAvg, in simulation.

For each number of sites (3, 5 and 10 by default) it synthesizes that many segmentation
hospitals and runs the same U-Net workload four times with `fedscan simulate`:
- with real local training (`--local-epochs`, default 1) and with training skipped
  (`local_epochs = 0`: the sites send the global weights back, so the round is the protocol
  alone: messaging, key agreement, secret sharing, masking, unmasking, and evaluation);
- each with `--no-secagg` and `--secagg`.

A round's wall time is what the ServerApp measured (training plus evaluation at every site).
Round 1 includes the sites' first preprocessing and warm-up, so the figure per run is the
median over rounds 2..R. The ratio is SecAgg+ / plaintext, from runs made one after the other
in this one invocation.

With `--sensitivity`, it also measures how far plaintext training itself moves when the round-1
global model is perturbed by uniform noise of the size SecAgg+'s quantization introduces: the
reason the final Dice of a SecAgg+ run and a plaintext run can differ by more than the weights do.

    python bench/secagg.py [--sites 3 5 10] [--rounds 3] [--local-epochs 1] [--image-size 64]
                           [--base-channels 16] [--sensitivity]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedscan.common.data.synthetic import synthesize

FEDSCAN = [sys.executable, "-m", "fedscan.common.cli"]
ENV = dict(os.environ, COLUMNS="200", NO_COLOR="1")


def simulate(data: Path, out: Path, secure: bool, epochs: int, args: argparse.Namespace) -> dict:
    cmd = [
        *FEDSCAN,
        "simulate",
        "--data-root",
        str(data),
        "--rounds",
        str(args.rounds),
        "--out",
        str(out),
        "--secagg" if secure else "--no-secagg",
        "--local-epochs",
        str(epochs),
        "--image-size",
        str(args.image_size),
        "--seed",
        "1",
        "--device",
        "cpu",
        "--overwrite",
    ]
    config = out.parent / f"{out.name}.toml"
    config.write_text(f'base_channels = {args.base_channels}\ncache_dir = "{out.parent / "cache"}"\n')
    cmd += ["--config", str(config)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    report["_wall"] = time.monotonic() - t0
    return report


def round_seconds(report: dict) -> float:
    times = [h["timing"]["round_seconds"] for h in report["history"]]
    return statistics.median(times[1:] or times)


def sensitivity(args: argparse.Namespace, root: Path) -> None:
    """Round 2 of plaintext FedAvg from the round-1 model, with and without noise."""
    import numpy as np
    import torch

    from fedscan.common.config import RunConfig
    from fedscan.common.data.layout import discover_sites
    from fedscan.common.models.registry import build_model
    from fedscan.common.tasks.local_training import evaluate_local, open_site, train_local

    data = root / "sens-data"
    synthesize(data, 3, seed=1)
    out = root / "sens-plain"
    cfg = RunConfig(seed=1, image_size=96, local_epochs=6)  # the README's default workload
    subprocess.run(
        [
            *FEDSCAN,
            "simulate",
            "--data-root",
            str(data),
            "--rounds",
            "1",
            "--out",
            str(out),
            "--no-secagg",
            "--seed",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        env=ENV,
        check=True,
    )
    start = torch.load(out / "checkpoints" / "round-001.pt", weights_only=True)["state_dict"]
    torch.set_num_threads(1)
    sites = [open_site(s, cfg, root / "sens-cache") for s in discover_sites(data)]

    def round2(weights: dict) -> dict[str, float]:
        states, counts = [], []
        for s in sites:
            m = build_model(cfg)
            m.load_state_dict(weights)
            counts.append(
                train_local(m, s, cfg, server_round=2, epochs=6, lr=1e-3, batch_size=4)["num-examples"]
            )
            states.append(m.state_dict())
        w = np.array(counts, dtype=np.float64) / sum(counts)
        avg = {
            k: sum(wi * st[k].double() for wi, st in zip(w, states, strict=True)).to(weights[k].dtype)
            for k in weights
        }
        dice = {}
        for s in sites:
            m = build_model(cfg)
            m.load_state_dict(avg)
            dice[s.name] = evaluate_local(m, s, cfg)["dice"]
        return dice

    base = round2(start)
    print("\nplaintext round 2 from the round-1 model, perturbed by uniform noise of amplitude eps")
    print("| eps | " + " | ".join(f"{s} Dice" for s in base) + " | largest change |")
    print("| --- |" + " ---: |" * (len(base) + 1))
    print("| 0 | " + " | ".join(f"{v:.4f}" for v in base.values()) + " | 0 |")
    gen = torch.Generator().manual_seed(0)
    for eps in (1e-6, 1e-7, 1e-8):
        noisy = {
            k: v + eps * (torch.rand(v.shape, generator=gen) * 2 - 1) if v.is_floating_point() else v
            for k, v in start.items()
        }
        d = round2(noisy)
        worst = max(abs(d[s] - base[s]) for s in base)
        print(f"| {eps:g} | " + " | ".join(f"{v:.4f}" for v in d.values()) + f" | {worst:.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 5, 10])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument(
        "--sensitivity", action="store_true", help="also measure plaintext training's sensitivity"
    )
    ap.add_argument("--keep", type=Path, help="keep the runs in this folder")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedscan-bench-secagg-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in args.sites:
            data = root / f"data-{n}"
            synthesize(data, n, seed=n)
            row: dict = {"sites": n}
            for label, epochs in (("training", args.local_epochs), ("protocol", 0)):
                for secure in (False, True):
                    rep = simulate(
                        data,
                        root / f"run-{n}-{label}-{'secagg' if secure else 'plain'}",
                        secure,
                        epochs,
                        args,
                    )
                    row[(label, secure)] = round_seconds(rep)
                    print(
                        f"{n} sites, {label}, {'SecAgg+' if secure else 'plaintext'}: "
                        f"{row[(label, secure)]:.2f} s per round ({rep['_wall']:.0f} s in all)",
                        flush=True,
                    )
            rows.append(row)

        from fedscan.common.config import RunConfig
        from fedscan.common.models.registry import build_model

        params = sum(
            v.numel()
            for v in build_model(RunConfig(base_channels=args.base_channels, image_size=args.image_size))
            .state_dict()
            .values()
        )
        print(
            f"\nU-Net, base_channels {args.base_channels} ({params / 1e6:.2f} M values), "
            f"{args.image_size} px, "
            f"{args.local_epochs} local epoch(s), median of rounds 2..{args.rounds}, {os.cpu_count()} CPUs"
        )
        print(
            "| sites | plaintext, training (s) | SecAgg+, training (s) | ratio (target <= 1.10) "
            "| plaintext, protocol only (s) | SecAgg+, protocol only (s) | ratio (target <= 1.30) |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            t0, t1 = r[("training", False)], r[("training", True)]
            p0, p1 = r[("protocol", False)], r[("protocol", True)]
            print(
                f"| {r['sites']} | {t0:.2f} | {t1:.2f} | {t1 / t0:.2f} "
                f"| {p0:.2f} | {p1:.2f} | {p1 / p0:.2f} |"
            )

        if args.sensitivity:
            sensitivity(args, root)


if __name__ == "__main__":
    main()
