"""Benchmark: one site's local training round (the ClientApp's work), by device.

Synthesizes one hospital, prepares it through the cache, then times `train_local` and
`evaluate_local` from fedscan.common.tasks.local_training on each requested device.

    python bench/local_training.py --devices cpu cuda --epochs 6
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fedscan.common.config import RunConfig
from fedscan.common.data.layout import discover_sites
from fedscan.common.data.synthetic import synthesize
from fedscan.common.models.registry import build_model
from fedscan.common.tasks.local_training import evaluate_local, open_site, resolve_device, train_local


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", nargs="+", default=["cpu"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a simulated site gets 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sites"
        synthesize(root, n_sites=3, seed=0)
        site_dir = discover_sites(root)[-1]  # the largest site
        for dev in args.devices:
            cfg = RunConfig(device=dev, local_epochs=args.epochs, image_size=args.image_size, seed=0)
            site = open_site(site_dir, cfg, Path(tmp) / "cache")
            torch.manual_seed(0)
            model = build_model(cfg)
            used = resolve_device(cfg.device)
            # warm-up: one short round so that CUDA context creation is not timed
            train_local(
                build_model(cfg),
                site,
                cfg,
                server_round=0,
                epochs=1,
                lr=cfg.learning_rate,
                batch_size=cfg.batch_size,
            )
            if used.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = train_local(
                model,
                site,
                cfg,
                server_round=1,
                epochs=cfg.local_epochs,
                lr=cfg.learning_rate,
                batch_size=cfg.batch_size,
            )
            if used.type == "cuda":
                torch.cuda.synchronize()
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            ev = evaluate_local(model, site, cfg)
            t_eval = time.perf_counter() - t0
            images = site.train_idx.size * cfg.local_epochs
            print(
                json.dumps(
                    {
                        "device": str(used),
                        "gpu": torch.cuda.get_device_name(0) if used.type == "cuda" else None,
                        "cpu_threads": args.threads,
                        "cpu": platform.processor() or platform.machine(),
                        "image_size": cfg.image_size,
                        "batch_size": cfg.batch_size,
                        "train_slices": int(site.train_idx.size),
                        "epochs": cfg.local_epochs,
                        "train_s": round(t_train, 2),
                        "train_images_per_s": round(images / t_train, 1),
                        "eval_s": round(t_eval, 2),
                        "train_loss": round(m["train_loss"], 4),
                        "val_dice_after_one_round": round(ev["dice"], 3),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
