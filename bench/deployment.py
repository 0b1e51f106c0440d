"""Benchmark: round wall time in deployment against simulation, for the same 3-site workload.

Synthesizes 3 segmentation hospitals, then trains the same run twice:
- simulation: `fedscan simulate --data-root ...` (Flower's simulation engine on Ray);
- deployment: `fedscan server init/start` (flower-superlink, TLS, site authentication), three
  `fedscan site init/start` daemons (flower-supernode) on 127.0.0.1, and `fedscan run`.

Per round it reports the wall time the ServerApp measured, the slowest site's compute (the
slowest training plus the slowest evaluation: a round waits for both), and the round overhead:
(round time - slowest compute) / round time. The overhead is messaging, process start-up (a
deployed SuperNode starts a fresh ClientApp process for every message), aggregation and
waiting. Round 1 also includes each site's first preprocessing into its cache.

The secure-aggregation mode is pinned on both sides (``--modes``: plaintext, SecAgg+ or both,
each reported on its own; `fedscan run` defaults to SecAgg+, `fedscan simulate` to plaintext).
In plaintext a round is one exchange (round r's evaluation rides on round r+1's training, see
``fedscan.server.round_loop``), so the last round's time is its evaluation alone: the ratio is
taken over the rounds between the first and the last (with 2 rounds: the second; every
round's own figures are in the table).

    python bench/deployment.py [--rounds 4] [--local-epochs 2] [--image-size 64] [--modes plain secagg]
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
from fedscan.common.flower_runtime import free_port, stop_process_tree

FEDSCAN = [sys.executable, "-m", "fedscan.common.cli"]
ENV = dict(os.environ, COLUMNS="200", NO_COLOR="1")


def cli(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([*FEDSCAN, *args], capture_output=True, text=True, env=ENV, check=False)
    if res.returncode != 0:
        raise SystemExit(f"fedscan {' '.join(args[:2])} failed:\n{res.stdout}\n{res.stderr}")
    return res


def spawn(log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*FEDSCAN, *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
        env=ENV,
        start_new_session=True,
    )


def wait(what: str, ok, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(1)
    raise SystemExit(f"timed out waiting for {what}")


def deploy(root: Path, data: Path, sites: list[str], run_args: list[str]) -> dict:
    coord, port = root / "coord", free_port()
    procs: list[subprocess.Popen] = []
    try:
        cli("server", "init", "--dir", str(coord), "--host", "localhost", "--port", str(port))
        procs.append(spawn(root / "superlink.out", "server", "start", "--dir", str(coord)))
        wait(
            "the SuperLink",
            lambda: (
                subprocess.run(
                    [*FEDSCAN, "server", "sites", "--dir", str(coord)], capture_output=True, env=ENV
                ).returncode
                == 0
            ),
        )
        for name in sites:
            cli("site", "init", "--dir", str(root / name), "--name", name, "--data", str(data / name))
            cli("server", "add-site", "--dir", str(coord), "--name", name, str(root / name / "site.pub"))
            procs.append(
                spawn(
                    root / f"{name}.out",
                    "site",
                    "start",
                    "--dir",
                    str(root / name),
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--ca",
                    str(coord / "ca.crt"),
                    "--runtime-port",
                    str(free_port()),
                    "--threads",
                    "1",
                )
            )
        wait(
            "the sites",
            lambda: cli("server", "sites", "--dir", str(coord)).stdout.count("online") >= len(sites),
        )
        cli(
            "run",
            "--superlink",
            f"127.0.0.1:{port}",
            "--ca",
            str(coord / "ca.crt"),
            "--sites",
            str(len(sites)),
            "--out",
            str(root / "run"),
            *run_args,
        )
        return json.loads((root / "run" / "report.json").read_text())
    finally:
        for p in procs:
            stop_process_tree(p)


def rows(report: dict) -> list[dict]:
    return [h["timing"] | {"round": h["round"]} for h in report["history"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=["plain", "secagg"], choices=["plain", "secagg"])
    args = ap.parse_args()
    run_args = [
        "--rounds",
        str(args.rounds),
        "--local-epochs",
        str(args.local_epochs),
        "--image-size",
        str(args.image_size),
        "--seed",
        str(args.seed),
        "--device",
        "cpu",
    ]
    with tempfile.TemporaryDirectory(prefix="fedscan-bench-deploy-") as tmp:
        root = Path(tmp)
        manifest = synthesize(root / "data", 3, seed=args.seed)
        sites = [p.name for p in manifest.sites]
        for mode in args.modes:
            flag = "--secagg" if mode == "secagg" else "--no-secagg"
            t0 = time.monotonic()
            cli(
                "simulate",
                "--data-root",
                str(root / "data"),
                "--out",
                str(root / f"sim-{mode}"),
                *run_args,
                flag,
            )
            sim_total = time.monotonic() - t0
            sim = json.loads((root / f"sim-{mode}" / "report.json").read_text())
            t0 = time.monotonic()
            dep = deploy(root / f"deploy-{mode}", root / "data", sites, [*run_args, flag])
            dep_total = time.monotonic() - t0
            report(args, mode, sim, dep, sim_total, dep_total)


def report(
    args: argparse.Namespace, mode: str, sim: dict, dep: dict, sim_total: float, dep_total: float
) -> None:
    print(
        f"\n{'SecAgg+' if mode == 'secagg' else 'plaintext'}: 3 sites, {args.rounds} rounds, U-Net "
        f"{args.image_size}px, {args.local_epochs} local epochs; whole command: simulation "
        f"{sim_total:.0f}s, deployment {dep_total:.0f}s (incl. setup)\n"
    )
    print(
        "| round | simulation round s | simulation slowest compute s | simulation overhead | "
        "deployment round s | deployment slowest compute s | deployment overhead | deployment overhead s "
        "| deployment / simulation |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s, d in zip(rows(sim), rows(dep), strict=True):
        print(
            f"| {s['round']} | {s['round_seconds']:.1f} | {s['slowest_compute_seconds']:.1f} | "
            f"{s['overhead_fraction']:.0%} | {d['round_seconds']:.1f} | {d['slowest_compute_seconds']:.1f} | "
            f"{d['overhead_fraction']:.0%} | {d['round_seconds'] - d['slowest_compute_seconds']:.1f} | "
            f"{d['round_seconds'] / s['round_seconds']:.2f}x |"
        )
    n = args.rounds
    middle = slice(1, n - 1) if n >= 3 else slice(1, None) if n > 1 else slice(None)
    ratio = statistics.mean(d["round_seconds"] for d in rows(dep)[middle]) / statistics.mean(
        s["round_seconds"] for s in rows(sim)[middle]
    )
    picked = [r["round"] for r in rows(dep)[middle]]
    print(
        f"\nrounds {picked}: deployment / simulation = {ratio:.2f}x; final mean Dice: simulation "
        f"{sim['final']['mean']['dice']:.3f}, deployment {dep['final']['mean']['dice']:.3f}"
    )


if __name__ == "__main__":
    main()
