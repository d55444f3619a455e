"""The Open Inference Protocol's (KServe v2, Triton's binary tensor data extension) names and datatypes as streamgpu
uses them: shared by the server's HTTP front end (``streamgpu.web.oip``) and the load generator's ``http``
transport, which must not need the server's packages (docs/HTTP.md)."""

from __future__ import annotations

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAME = "output"
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor data extension's header

# Open Inference Protocol datatype <-> numpy (little-endian, as the wire's dtypes)
DATATYPES: dict[str, np.dtype] = {
    "UINT8": np.dtype("u1"), "INT8": np.dtype("i1"), "UINT16": np.dtype("<u2"), "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}  # fmt: skip
DATATYPE_OF: dict[np.dtype, str] = {dt: name for name, dt in DATATYPES.items()}
