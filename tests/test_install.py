"""A newcomer's plain ``pip install asd-monitor`` (no extra): ``--help`` and ``--version`` work,
and a command that needs a missing package says in one line which extra brings it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A child interpreter in which the named packages cannot be imported, as on an install without
# the extra that brings them.
HIDE = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
from {module} import main
sys.exit(main({argv!r}))
"""


def run_without(hidden: set[str], module: str, argv: list[str]) -> subprocess.CompletedProcess:
    code = HIDE.format(hidden=sorted(hidden), module=module, argv=argv)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["score", "--help"]])
def test_help_and_version_work_without_onnxruntime(argv: list[str]) -> None:
    result = run_without({"onnxruntime"}, "monitor.cli", argv)
    assert result.returncode == 0, result.stderr
    assert "usage: asd-monitor" in result.stdout or "asd-monitor 0." in result.stdout


def test_a_command_that_needs_onnxruntime_names_the_extra(tmp_path: Path) -> None:
    clip = REPO / "monitor" / "assets" / "demo" / "mimii-fan" / "normal_00.flac"
    result = run_without({"onnxruntime"}, "monitor.cli", ["score", "--bank", str(tmp_path / "bank"), str(clip)])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "asd-monitor: error: onnxruntime is not installed: pip install 'asd-monitor[cpu]' "
        "(or 'asd-monitor[gpu]' on a CUDA host; never both)"]


@pytest.mark.parametrize("argv", [["--help"], ["list"]])
def test_asd_export_without_torch_names_the_extra(argv: list[str]) -> None:
    result = run_without({"torch"}, "export.cli", argv)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "asd-export: error: torch is not installed: asd-export needs the export extra (pip install -e '.[export]')"]
