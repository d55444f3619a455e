"""streamgpu's load generator: closed- and open-loop load, windows until stable, reports.

Use it from the command line (``python tools/loadgen.py --help``) or from
Python::

    from streamgpu.loadgen import Endpoint, LoadLevel, RunConfig, run

    report = run(RunConfig(endpoints=[Endpoint("127.0.0.1", 7878)], levels=[LoadLevel("concurrency", 4)]))
    print(report.table())
"""

from streamgpu.loadgen.config import CONCURRENCY, RATE, Endpoint, LoadLevel, RunConfig
from streamgpu.loadgen.errors import LoadgenError, UsageError
from streamgpu.loadgen.measure import LevelResult, percentile, percentiles
from streamgpu.loadgen.report import RunReport
from streamgpu.loadgen.runner import run
from streamgpu.loadgen.transports import Transport, get_transport, register_transport, transport_names

__all__ = [
    "CONCURRENCY",
    "RATE",
    "Endpoint",
    "LevelResult",
    "LoadLevel",
    "LoadgenError",
    "RunConfig",
    "RunReport",
    "Transport",
    "UsageError",
    "get_transport",
    "percentile",
    "percentiles",
    "register_transport",
    "run",
    "transport_names",
]
