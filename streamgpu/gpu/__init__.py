"""Device backends (cuda, cpu), the completion bridge and device kernels."""
