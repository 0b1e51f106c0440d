"""FedBN's site-local layers: the normalization layers a site keeps on its disk and never sends.

FedBN (Li, Jiang, Zhang, Kamp and Dou, "FedBN: Federated Learning on Non-IID Features via
Local Batch Normalization", ICLR 2021) averages every layer but the normalization layers, which
each site keeps to absorb its own feature shift (scanner, protocol, calibration). Here that is
every normalization layer of the model: BatchNorm (weights, biases and running statistics), and
the affine InstanceNorm of fedscan's U-Net (see ``fedscan.common.weights.norm_keys``).

The site keeps them on its own disk, one file per round, under its cache folder: training in
round r starts from round r-1's local layers, evaluation in round r uses round r's. Files per
round make a resumed run train exactly as an uninterrupted one would. The personalized model of
a site is the global model with that site's local layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from fedscan.common.config import RunConfig
from fedscan.common.weights import norm_keys

log = logging.getLogger("fedscan.client")


# settings that do not change what a site trains: where files are, which device, reporting
_NOT_IN_KEY = frozenset({"rounds", "data_root", "cache_dir", "output", "device", "explain_scores", "workers"})
# settings added after FedBN runs existed: left out at their defaults, so that those runs (and
# their model files) keep their key
_KEYED_ONLY_IF_SET = {"lr_schedule": "constant", "lr_final_fraction": 0.05, "ct_normalization": "window"}


def run_key(cfg: RunConfig) -> str:
    """A key for the run's local layers: the same training settings give the same key, wherever the
    files are (so `fedscan site explain` finds them from the run's model file)."""
    settings = {
        k: v
        for k, v in cfg.to_toml_dict().items()
        if k not in _NOT_IN_KEY and not (k in _KEYED_ONLY_IF_SET and v == _KEYED_ONLY_IF_SET[k])
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class LocalLayers:
    """One site's FedBN layers for one run, a file per round."""

    def __init__(self, cache_root: Path, cfg: RunConfig, site: str) -> None:
        self.folder = Path(cache_root) / "fedbn" / run_key(cfg) / site

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:03d}.pt"

    def save(self, server_round: int, model: nn.Module) -> None:
        keys = norm_keys(model)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(server_round).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path(server_round))

    def forget_from(self, server_round: int) -> None:
        """Remove the layers stored for ``server_round`` and later: before training that round they
        can only be an earlier run's, or this round's from before an interruption."""
        for path in self.folder.glob("round-*.pt") if self.folder.is_dir() else []:
            if int(path.stem.split("-")[1]) >= server_round:
                path.unlink(missing_ok=True)

    def latest(self, up_to: int) -> int | None:
        """The last round, at most ``up_to``, whose local layers are stored."""
        rounds = (
            [int(p.stem.split("-")[1]) for p in self.folder.glob("round-*.pt")]
            if self.folder.is_dir()
            else []
        )
        rounds = [r for r in rounds if r <= up_to]
        return max(rounds) if rounds else None

    def apply(self, model: nn.Module, up_to: int) -> int | None:
        """Put the site's local layers of round ``up_to`` (or the last before it) into ``model``;
        the round used, or None when there are none yet (the model keeps the global ones)."""
        found = self.latest(up_to)
        if found is None:
            return None
        state = torch.load(self.path(found), map_location="cpu", weights_only=True)
        keys = norm_keys(model)
        if set(state) != keys:
            log.warning(
                "FedBN: stored local layers of round %d do not fit the model; using the global ones", found
            )
            return None
        model.load_state_dict(state, strict=False)
        return found
