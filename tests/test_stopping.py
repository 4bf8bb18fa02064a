"""Stops end in one line and a known exit status at any moment (issue 26.5)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import stopping

ROOT = Path(__file__).resolve().parents[1]


def test_a_stop_outside_training_is_one_line_and_its_exit_status(capsys):
    def body():
        raise stopping.Terminated()

    assert stopping.run_stoppable("prog", body) == 143
    err = capsys.readouterr().err
    assert err.startswith("prog: terminated (SIGTERM)") and err.count("\n") == 1

    def interrupted():
        raise KeyboardInterrupt

    assert stopping.run_stoppable("prog", interrupted) == 130


def test_a_swallowed_stop_is_raised_again_at_the_next_safe_point():
    def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException:  # a third-party callback that swallows everything
            pass
        stopping.check_stop()  # the runner's safe point between experiences
        return 0

    assert stopping.run_stoppable("prog", body) == 143
    stopping.check_stop()  # the request is forgotten once handled: a new command starts clean
    with stopping.stop_handlers():
        stopping.check_stop()


def test_the_handlers_leave_a_callers_own_handler_alone():
    mine = lambda *a: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with stopping.stop_handlers():
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("module", ["benchmarks.compare", "benchmarks.studies.ed_kd"])
def test_sigterm_during_start_up_ends_in_one_line(module, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", module, "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # past the handlers, inside the imports of torch and Avalanche or the data loading
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err and err.strip().count("\n") == 0
