"""Device backends: where batches run (``cuda``: torch + cupy; ``cpu``: the host).

``BACKENDS`` maps a backend name to its class as a ``module:Class`` string,
imported on first use, so that validating a config imports neither torch nor
cupy (this module imports nothing). ``auto`` picks cuda when a device is
usable. A new backend is one module plus one line here.
"""

BACKENDS: dict[str, str] = {
    "cuda": "streamgpu.gpu.cuda:CudaBackend",
    "cpu": "streamgpu.gpu.cpu:CpuBackend",
}
DEVICES = ("auto", *BACKENDS)
