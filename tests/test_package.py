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


def test_import_without_the_cpp_core_falls_back_with_one_warning():
    """A missing switchcit._C: the library imports, warns once, and CPU ops use the torch backend."""
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'switchcit._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, switchcit\n"
        "    from switchcit.ops import select_backend\n"
        "    x = torch.randn(4, 8)\n"
        "    y = switchcit.lora_delta(x, torch.randn(2, 3, 8), torch.randn(2, 5, 3), "
        "torch.tensor([0, 1, -1, 0]), 1.0)\n"
        "ours = [w for w in caught if 'C++ core' in str(w.message)]\n"
        "assert len(ours) == 1, [str(w.message) for w in caught]\n"
        "assert select_backend(None, x) == 'torch' and y.shape == (4, 5)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
