"""The process group matrec creates is destroyed at a normal exit and left alone after an uncaught
exception (in-process: the atexit hook and sys.excepthook are captured, no group is created)."""
import sys

import pytest

from matrec.train import distributed


@pytest.fixture
def exit_hooks(monkeypatch):
    """Run ``_destroy_at_exit`` with atexit, the excepthook chain and the group faked; returns
    ``(run_atexit, destroyed, previous_calls)``."""
    registered, destroyed, previous_calls = [], [], []
    monkeypatch.setattr(distributed, "_failed", [])
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    monkeypatch.setattr(sys, "excepthook", lambda *exc: previous_calls.append(exc))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(True))
    distributed._destroy_at_exit()
    assert len(registered) == 1

    def run_atexit():
        registered[0]()

    return run_atexit, destroyed, previous_calls


def test_normal_exit_destroys_the_group(exit_hooks):
    run_atexit, destroyed, previous_calls = exit_hooks
    run_atexit()
    assert destroyed == [True] and previous_calls == []


def test_uncaught_exception_leaves_the_group_and_still_reports(exit_hooks):
    run_atexit, destroyed, previous_calls = exit_hooks
    exc = RuntimeError("rank failed")
    sys.excepthook(RuntimeError, exc, None)
    run_atexit()
    assert destroyed == []
    assert previous_calls == [(RuntimeError, exc, None)]  # the traceback is still printed


def test_a_failure_the_cli_reports_itself_leaves_the_group(exit_hooks, tmp_path):
    # the CLI turns ValueError & co. into a clean exit 2; under torchrun that rank may be failing
    # alone while the others wait in a collective, so it must not destroy the group either
    from matrec.cli import main
    run_atexit, destroyed, previous_calls = exit_hooks
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "no-such-run")])
    assert exit_info.value.code == 2
    run_atexit()
    assert destroyed == [] and previous_calls == []
