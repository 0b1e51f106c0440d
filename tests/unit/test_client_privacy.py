"""A failing site tells the server only that it failed: no paths, no DICOM values."""

from __future__ import annotations

import logging

import pytest

from fedscan.client.app import SiteFailure, _site_errors
from fedscan.common.errors import FedscanError

SECRET = "/data/hospital-x/images/DOE^JOHN/1.2.840.113619.2.55"


@pytest.mark.parametrize("exc", [FedscanError(f"cannot read {SECRET}"), ValueError(SECRET)])
def test_failure_reason_is_generic(exc: Exception, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    with pytest.raises(SiteFailure) as info, _site_errors("training"):
        raise exc
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "training failed" in str(info.value)
    assert SECRET in caplog.text  # the details stay in the site's own log


def test_step_counters_leave_a_site_at_their_global_value() -> None:
    """BatchNorm's num_batches_tracked counts local steps, which would tell the exact example
    count: the ClientApp puts it back to the global value; the trained floats stay."""
    import torch
    from flwr.app import ArrayRecord
    from torch import nn

    from fedscan.client.site_round import keep_global_counters

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    start = ArrayRecord(model.state_dict())
    model.train()
    for _ in range(7):
        model(torch.randn(4, 1, 8, 8))
    assert int(model[1].num_batches_tracked) == 7
    moved = model[1].running_mean.clone()
    keep_global_counters(model, start)
    assert int(model[1].num_batches_tracked) == 0
    assert torch.equal(model[1].running_mean, moved) and moved.abs().sum() > 0
