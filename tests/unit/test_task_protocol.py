"""Every registered task satisfies the ``Task`` protocol that callers are typed against."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from fedscan.common.config import TASKS
from fedscan.common.errors import FedscanError
from fedscan.common.tasks.registry import REGISTERED, Task, get_task, task_metrics, task_scores

_METHODS = ("check_data", "train", "evaluate")


def _parameters(fn: object, drop_self: bool) -> list[tuple[str, object, object]]:
    params = list(inspect.signature(fn).parameters.values())  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in params[1 if drop_self else 0 :]]


def test_every_task_the_config_allows_is_registered() -> None:
    assert tuple(REGISTERED) == TASKS


@pytest.mark.parametrize("name", TASKS)
def test_each_registered_task_satisfies_the_protocol(name: str) -> None:
    task = get_task(name)
    assert isinstance(task, Task)
    for method in _METHODS:  # the same parameters, kinds and defaults as the protocol declares
        assert _parameters(getattr(task, method), False) == _parameters(getattr(Task, method), True), method
    assert isinstance(task.METRICS, tuple) and all(isinstance(m, str) for m in task.METRICS)
    assert isinstance(task.SCORES, tuple) and all(isinstance(s, str) for s in task.SCORES)
    assert task.MAIN_METRIC in task.METRICS
    assert task_metrics(name) == (task.METRICS, task.MAIN_METRIC) and task_scores(name) == task.SCORES


def test_a_module_without_a_member_is_no_task() -> None:
    members = {
        "METRICS": ("a",),
        "MAIN_METRIC": "a",
        "SCORES": (),
        "check_data": print,
        "train": print,
        "evaluate": print,
    }
    assert isinstance(SimpleNamespace(**members), Task)
    for left_out in members:
        assert not isinstance(SimpleNamespace(**{k: v for k, v in members.items() if k != left_out}), Task), (
            left_out
        )


def test_an_unknown_task_is_a_clear_error() -> None:
    with pytest.raises(
        FedscanError, match="unknown task 'restoration'; allowed: segmentation, classification"
    ):
        get_task("restoration")
