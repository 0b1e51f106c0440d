"""The local learning rate of each round: constant, or a cosine decay over the run's rounds.

Every site trains round r with the same rate, sent by the server in the round's training
config; the local-only and pooled baselines follow the same schedule round by round, so that
they stay comparable at the same compute. A resumed run continues the schedule where it broke.

    cosine: lr_r = lr · (f + (1 − f) · ½ · (1 + cos(π · (r − 1) / (R − 1))))

for round r of R (r = 1 … R), f being ``lr_final_fraction``: the first round trains at ``lr``,
the last at f · lr.
"""

from __future__ import annotations

import math

from fedscan.common.config import RunConfig


def round_lr(run: RunConfig, server_round: int) -> float:
    """The learning rate the sites train round ``server_round`` (1-based) with."""
    if run.lr_schedule == "constant" or run.rounds == 1:
        return run.learning_rate
    progress = min(max(server_round - 1, 0), run.rounds - 1) / (run.rounds - 1)
    f = run.lr_final_fraction
    return run.learning_rate * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress)))
