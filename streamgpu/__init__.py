"""streamgpu: stream frames over the network into DNNs on a GPU, from one asyncio loop."""

__version__ = "0.1.0"
