"""Run a command as a user would (pretrain_gpt.py, torchrun, a tool), with a deadline.

The command gets its own process group, so on timeout torchrun and every worker it started
are killed together (a plain subprocess timeout kills torchrun only and leaves its workers
running), and the test fails naming the command, with the end of what it printed.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Well under the 5-minute collective timeout (--distributed-timeout-minutes) a stuck rank would
# otherwise wait for; the slowest command here takes about 15 s on 2 cores.
TIMEOUT = 120.0


def run_command(cmd: list[str], timeout: float = TIMEOUT, env: dict[str, str] | None = None,
                cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish within {timeout:g} s; it printed:\n"
                    f"{out[-2000:]}\n{err[-4000:]}", pytrace=False)
    finally:
        if proc.poll() is None:  # interrupted (pytest-timeout, Ctrl-C): leave no worker behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
