"""benchmarks/gpu.py cannot rot: its --dry-run (tiny sizes, CPU, the same code paths) runs in the suite and every
correctness row passes."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    sections = {row[0] for row in result["rows"]}
    assert sections == {"correctness", "training", "decode", "moe"}
    checks = [row for row in result["rows"] if row[0] == "correctness"]
    assert len(checks) == 14 and all(row[-1] == "ok" for row in checks), checks
    assert result["details"]["decode"]["tokens_equal_eager"]
    values = [row[2] for row in result["rows"] if row[0] != "correctness"]
    assert all(v > 0 for v in values if v == v)
    assert sum(v != v for v in values) == 2  # the two rows measured against this GPU's own rates (NaN on a CPU)
