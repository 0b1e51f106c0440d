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
