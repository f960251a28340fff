"""The GPU install path: `pip install '.[gpu]'` gives onnxruntime-gpu instead of onnxruntime
(never both: they own the same module), and on a machine without CUDA the daemon's
`provider: auto` falls back to the CPU provider and embeds exactly as the CPU build does."""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest

from monitor.scoring.backbone import Backbone
from tests.synth import machine_sound

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, numpy as np, onnxruntime as ort
from importlib.metadata import distributions
from monitor.scoring.backbone import Backbone
names = sorted(d.metadata["Name"].lower() for d in distributions())
x = np.load(sys.argv[1])
backbone = Backbone.load("logmel", "auto")
print(json.dumps({"dists": [n for n in names if n.startswith("onnxruntime")], "provider": backbone.provider,
                  "available": ort.get_available_providers(), "embedding": backbone.embed(x).tolist()}))
"""


@pytest.mark.skipif(os.environ.get("ASD_SKIP_GPU_VARIANT") == "1", reason="ASD_SKIP_GPU_VARIANT=1")
def test_gpu_extra_installs_alone_and_runs_on_the_cpu_provider_here(tmp_path: Path) -> None:
    env_dir = tmp_path / "gpu-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[gpu]"],
                             capture_output=True, text=True, timeout=1200)
    if install.returncode != 0 and "No matching distribution" in install.stderr:
        pytest.skip(f"onnxruntime-gpu is not available for this platform: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr[-2000:]
    x = np.stack([machine_sound(1, 10.0)])
    np.save(tmp_path / "x.npy", x)
    probe = subprocess.run([str(python), "-c", PROBE, str(tmp_path / "x.npy")], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-2000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["dists"] == ["onnxruntime-gpu"]  # the CPU build was not pulled in beside it
    assert "CUDAExecutionProvider" in result["available"]
    assert result["provider"] == "CPUExecutionProvider"  # no CUDA here: auto fell back, and said so
    expected = Backbone.load("logmel", "cpu").embed(x)
    np.testing.assert_allclose(np.array(result["embedding"], dtype=np.float32), expected, rtol=1e-5, atol=1e-5)
