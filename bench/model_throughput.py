"""Benchmark: training throughput (images/s) of every model at its default settings.

Runs the real training loop (``fedscan.common.tasks.loops.fit``, with the task's loss) on
random inputs of each model's default image size and batch size, so the figure is the
model's compute cost, independent of data loading. The exam model ``mil`` is fed exams of
``--exam-images`` images; its figure counts images, not exams.

On CUDA it compares float32 against the automatic mixed precision the sites use
(bfloat16 where supported, with channels_last), both through the same code path.

    python bench/model_throughput.py --devices cpu --threads 1
    python bench/model_throughput.py --devices cuda --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fedscan.common.config import EXAM_MODELS, MODELS, TASK_MODELS, RunConfig
from fedscan.common.models.registry import build_model
from fedscan.common.tasks import classification, segmentation
from fedscan.common.tasks.loops import fit
from fedscan.common.tasks.precision import Precision, choose_precision


def _config(model: str) -> RunConfig:
    task = next(t for t, models in TASK_MODELS.items() if model in models)
    return RunConfig(task=task, model=model)


def _batches(cfg: RunConfig, steps: int, exam_images: int, gen: torch.Generator) -> list:
    s, b = cfg.image_size, cfg.batch_size
    out = []
    for _ in range(steps):
        if cfg.model in EXAM_MODELS:
            x = [torch.rand(exam_images, 1, s, s, generator=gen) for _ in range(b)]
            y = torch.randint(0, cfg.num_classes, (b,), generator=gen)
        elif cfg.task == "segmentation":
            x = torch.rand(b, 1, s, s, generator=gen)
            y = torch.randint(0, cfg.num_classes, (b, 1, s, s), generator=gen)
        else:
            x = torch.rand(b, 1, s, s, generator=gen)
            y = torch.randint(0, cfg.num_classes, (b,), generator=gen)
        out.append((x, y))
    return out


def measure(model_name: str, precision: Precision, steps: int, exam_images: int) -> dict:
    cfg = _config(model_name)
    torch.manual_seed(0)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    if cfg.task == "segmentation":
        loss_fn, forward = segmentation.make_loss(), None
    else:
        loss_fn = torch.nn.CrossEntropyLoss()
        forward = classification.forward_exams if cfg.model in EXAM_MODELS else None
    warm = _batches(cfg, 2, exam_images, gen)
    timed = _batches(cfg, steps, exam_images, gen)
    fit(model, lambda: warm, loss_fn, epochs=1, lr=1e-3, precision=precision, forward=forward)
    if precision.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fit(model, lambda: timed, loss_fn, epochs=1, lr=1e-3, precision=precision, forward=forward)
    if precision.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    per_batch = cfg.batch_size * (exam_images if cfg.model in EXAM_MODELS else 1)
    return {
        "model": model_name,
        "task": cfg.task,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "images_per_batch": per_batch,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "steps": steps,
        "seconds": round(seconds, 2),
        "train_images_per_s": round(per_batch * steps / seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per model")
    ap.add_argument("--exam-images", type=int, default=12, help="images per exam for mil")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a simulated site gets 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for dev in args.devices:
        device = torch.device(dev)
        modes = {"fp32": Precision(device)}
        if dev == "cuda":
            modes["amp"] = choose_precision(device, amp=True, channels_last=True)
        for name in args.models:
            for mode, precision in modes.items():
                row = measure(name, precision, args.steps, args.exam_images)
                row.update(
                    {
                        "device": dev,
                        "precision": mode if dev == "cuda" else "fp32",
                        "amp_dtype": str(precision.amp_dtype).removeprefix("torch.")
                        if precision.amp_dtype
                        else None,
                        "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None,
                        "cpu_threads": args.threads if dev == "cpu" else None,
                        "cpu": platform.processor() or platform.machine(),
                        "torch": torch.__version__,
                    }
                )
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
