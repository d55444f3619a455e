"""Model specs, builtin architectures, loaders and pre-processing."""
