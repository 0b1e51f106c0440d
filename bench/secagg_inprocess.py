"""Benchmark and check: one SecAgg+ round in one process, with sites that really trained.

Synthetic sites each train the same global U-Net (``fedscan.common.tasks.local_training.train_local``, on
CUDA when asked: AMP and channels_last as the sites use them). Their updates then go through
Flower's SecAgg+ in one process: fedscan's server bridge runs ``SecAggPlusWorkflow``, and every
message reaches fedscan's client half (``secaggplus_mod``) through Flower's protobuf
serialization, as on the wire. It prints:
- the largest difference between the secure aggregate and the plaintext example-weighted mean,
  against the quantization bound (``fedscan.common.secagg_numerics.error_bound``);
- the slowest site's training time against the protocol's own time (all sites' key agreement,
  secret sharing and masking, and the server's unmasking, one after the other on one CPU
  thread: in a federation each site masks on its own machine, in parallel).

No Ray, no SuperLink: it runs where Flower's simulation cannot be installed, such as a GPU box.

    python bench/secagg_inprocess.py [--sites 3] [--base-channels 16] [--device cuda] [--epochs 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedscan.client.secagg import secure_train
from fedscan.common.config import RunConfig
from fedscan.common.data.layout import discover_sites
from fedscan.common.data.synthetic import synthesize
from fedscan.common.models.registry import build_model
from fedscan.common.secagg_numerics import decode_aggregate, error_bound
from fedscan.common.tasks.local_training import open_site, train_local
from fedscan.server.secagg import make_workflow, secure_train_round


class InProcessSites:
    """A Grid whose sites answer in this process, through protobuf, with their trained models."""

    def __init__(self, cfg: RunConfig, trained: dict[int, dict], counts: dict[int, int]) -> None:
        self.cfg, self.trained, self.counts = cfg, trained, counts
        self.state = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in trained
        }
        self.sent = 0

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"  # what a SuperLink would assign
            msg = message_from_proto(message_to_proto(msg))
            nid = msg.metadata.dst_node_id

            def train(arrays, config, ctxt, nid=nid):  # noqa: ANN001, ANN202
                model = build_model(self.cfg)
                model.load_state_dict(self.trained[nid])
                return model, {"num-examples": self.counts[nid], "train_loss": 0.0}, "site"

            reply = secure_train(msg, self.state[nid], train, lambda nid=nid: list(self.trained[nid]))
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp process has
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory(prefix="fedscan-secagg-") as tmp:
        synthesize(Path(tmp) / "data", args.sites, seed=1)
        cfg = RunConfig(
            image_size=args.image_size,
            base_channels=args.base_channels,
            device=args.device,
            seed=1,
            secagg=True,
        )
        sites = [open_site(s, cfg, Path(tmp) / "cache") for s in discover_sites(Path(tmp) / "data")]
        torch.manual_seed(1)
        start = build_model(cfg).state_dict()
        nodes = [101 * (i + 1) for i in range(args.sites)]
        trained, counts, slowest = {}, {}, 0.0
        for nid, site in zip(nodes, sites, strict=True):
            model = build_model(cfg)
            model.load_state_dict(start)
            sync()
            t0 = time.perf_counter()
            metrics = train_local(model, site, cfg, server_round=1, epochs=args.epochs, lr=1e-3, batch_size=4)
            sync()
            slowest = max(slowest, time.perf_counter() - t0)
            trained[nid], counts[nid] = model.state_dict(), int(metrics["num-examples"])

        plan = cfg.secagg_plan(args.sites)
        ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        t0 = time.perf_counter()
        delta, _, _ = secure_train_round(
            InProcessSites(cfg, trained, counts),
            ctx,
            1,
            ArrayRecord(start),
            ConfigRecord({}),
            make_workflow(cfg, plan, args.sites),
            nodes,
        )
        protocol = time.perf_counter() - t0

    secure = decode_aggregate({k: v.numpy() for k, v in start.items()}, delta.to_numpy_ndarrays())
    w = np.array([counts[n] for n in nodes], dtype=np.float64) / sum(counts.values())
    worst = max(
        float(
            np.abs(
                secure[k].astype(np.float64)
                - sum(wi * trained[n][k].double().numpy() for wi, n in zip(w, nodes, strict=True))
            ).max()
        )
        for k in start
        if start[k].is_floating_point()
    )
    bound = error_bound(
        cfg.secagg_clipping_range, plan.quantization_range, cfg.secagg_max_weight, list(counts.values())
    )
    values = sum(v.numel() for v in start.values())
    print(
        f"U-Net base_channels {args.base_channels} ({values / 1e6:.2f} M values), {args.sites} sites, "
        f"{args.epochs} epochs on {args.device}"
    )
    print(
        f"secure aggregate against the plaintext mean: largest difference {worst:.3g}, bound {bound:.3g}: "
        f"{'within' if worst <= bound else 'EXCEEDED'}"
    )
    print(
        f"slowest site's training: {slowest:.2f} s; "
        f"SecAgg+ protocol, all parties in one process: {protocol:.2f} s"
    )


if __name__ == "__main__":
    main()
