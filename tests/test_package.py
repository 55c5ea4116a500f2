"""Packaging: the wheel builds in pip's isolated environment (no torch there), carries the C++ core
and installs the Triton kernels as ``switchcit.kernels``, never as a top-level ``kernels``."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="checks the Linux wheel layout")
def test_wheel_layout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("switchcit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "switchcit/kernels/lora.py" in names
    assert "switchcit/kernels/__init__.py" in names
    assert any(n.startswith("switchcit/_C") and n.endswith(".so") for n in names)
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must not be a top-level package"


def test_kernels_import_as_subpackage():
    import switchcit.kernels

    assert switchcit.kernels.__name__ == "switchcit.kernels"
    assert Path(switchcit.kernels.__file__).parent == ROOT / "kernels" or "site-packages" in switchcit.kernels.__file__
