"""Which cupy build goes with the installed torch, and ``streamgpu setup-gpu``, which installs it.

cupy ships one wheel per CUDA major version (``cupy-cuda12x``, ``cupy-cuda13x``); the one that
matches ``torch.version.cuda`` gives the fast data path (streamgpu's gather and pre-processing
kernels). Importing this module imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def torch_cuda_version() -> str | None:
    """The CUDA version the installed torch was built for (None: a CPU build, or no torch)."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.version.cuda


def cupy_package(cuda: str | None = None) -> str | None:
    """``cupy-cuda13x`` etc. for ``cuda`` (default: torch's CUDA), None without CUDA."""
    cuda = cuda if cuda is not None else torch_cuda_version()
    if not cuda:
        return None
    return f"cupy-cuda{cuda.split('.')[0]}x"


def setup_gpu() -> int:
    """Install the cupy build matching torch's CUDA into this Python (no-op on a CPU build). Exit code."""
    cuda = torch_cuda_version()
    package = cupy_package(cuda)
    if package is None:
        print("setup-gpu: torch has no CUDA build here; nothing to install (the CPU backend needs no cupy)")
        return 0
    if importlib.util.find_spec("cupy") is not None:
        import importlib.metadata as metadata

        have = [d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].startswith("cupy")]
        if package in have:
            print(f"setup-gpu: {package} is installed (torch CUDA {cuda}); the cupy kernels will be used")
            return 0
        print(f"setup-gpu: installed {have} does not match torch's CUDA {cuda}; installing {package}")
    command = [sys.executable, "-m", "pip", "install", package]
    print("setup-gpu:", " ".join(command))
    return subprocess.call(command)
