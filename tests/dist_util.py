"""Launch a check script of tests/ under torchrun (gloo, one thread per process) and require 'NAME: ok' for each
named check in its output."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import llmarch

ROOT = Path(__file__).resolve().parents[1]
SRC = str(Path(llmarch.__file__).resolve().parents[1])


def launch(script: str, nproc: int, args: list[str], checks: list[str], timeout: int = 300) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / script), *args, *checks]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in checks:
        assert f"{name}: ok" in done.stdout, done.stdout
    return done.stdout
