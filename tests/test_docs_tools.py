"""minSDXL/compare.py: our UNet against diffusers' on an SDXL folder."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compare_reports_zero_error_on_tiny(tiny_model):
    out = subprocess.run(
        [
            sys.executable,
            "minSDXL/compare.py",
            "--pretrained_model",
            str(tiny_model),
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    err = re.search(r"max \|ours - diffusers\| = (\S+)", out.stdout)
    assert err is not None and float(err.group(1)) <= 1e-6
    assert re.search(r"^ours\s+[\d.]+\s+[\d.]+$", out.stdout, re.M)
    assert re.search(r"^diffusers\s+[\d.]+\s+[\d.]+$", out.stdout, re.M)
