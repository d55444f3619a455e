#!/usr/bin/env python3
"""Load generator for streamgpu servers; see docs/LOADGEN.md or ``--help``.

A thin wrapper so it runs from a checkout (``python tools/loadgen.py``); the
installed command is ``streamgpu-loadgen``.
"""

import sys
from pathlib import Path

# From a checkout, make the package next to tools/ importable (also in spawned --processes workers).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamgpu.loadgen.cli import main

if __name__ == "__main__":
    sys.exit(main())
