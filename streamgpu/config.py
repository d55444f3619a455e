"""One Config for a server process, from a TOML file, then ``STREAMGPU_*`` environment
variables, then explicit overrides (the CLI's flags), each layer over the last.

configs/example.toml shows every setting with a comment.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamgpu.gpu.backend import BACKENDS
from streamgpu.loops import LOOPS
from streamgpu.memory import ALIGNMENT
from streamgpu.models.spec import ModelSpec

MiB = 1024 * 1024
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message says which and how to fix it."""


@dataclass
class Config:
    """Everything a server process needs. Sizes in bytes, times in seconds unless named otherwise."""

    host: str = "127.0.0.1"
    port: int = 7878
    device: str = "auto"
    device_index: int = 0
    cuda_kernels: bool = True
    loop: str = "auto"
    auth_token: str = ""
    ring_bytes: int = 256 * MiB
    max_payload_bytes: int = 64 * MiB
    max_frames_per_connection: int = 4096
    receive_timeout_s: float = 10.0
    max_inflight_batches: int = 2
    shutdown_timeout_s: float = 10.0
    log_level: str = "INFO"
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec()])

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be 0..65535, got {self.port}")
        if self.device not in BACKENDS:
            problems.append(f"device must be one of {BACKENDS}, got {self.device!r}")
        if self.loop not in LOOPS:
            problems.append(f"loop must be one of {LOOPS}, got {self.loop!r}")
        if self.ring_bytes < 4096:
            problems.append(f"ring_bytes must be at least 4096, got {self.ring_bytes}")
        largest = self.ring_bytes - ALIGNMENT  # a slot is rounded up to the ring's alignment
        if not 0 < self.max_payload_bytes <= largest:
            problems.append(
                f"max_payload_bytes must be 1..ring_bytes - {ALIGNMENT} ({largest}), got {self.max_payload_bytes}"
            )
        if self.receive_timeout_s <= 0:
            problems.append(f"receive_timeout_s must be > 0, got {self.receive_timeout_s}")
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.max_frames_per_connection < 1 or self.max_inflight_batches < 1:
            problems.append("max_frames_per_connection and max_inflight_batches must be >= 1")
        if self.shutdown_timeout_s < 0:
            problems.append("shutdown_timeout_s must be >= 0")
        if not self.models:
            problems.append("at least one model is needed")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            problems.append(f"model names must be unique, got {names}")
        for m in self.models:
            if m.frame_nbytes > self.max_payload_bytes:
                problems.append(f"model {m.name!r} frames ({m.frame_nbytes} bytes) exceed max_payload_bytes")
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def load(cls, path: str | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """File, then environment, then ``overrides`` (None values are ignored)."""
        values: dict[str, Any] = {}
        if path:
            try:
                with open(path, "rb") as f:
                    values.update(_from_toml(tomllib.load(f), path))
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
        values.update(_from_env(os.environ if env is None else env))
        model_source = overrides.pop("model", None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        try:
            config = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        if model_source:
            config = config.with_default_model_source(model_source)
        return config

    def with_default_model_source(self, source: str) -> Config:
        """Serve ``source`` (``builtin:resnet50``, ``torchscript:model.pt``...) as the first model."""
        try:
            first = dataclasses.replace(self.models[0], source=source)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return dataclasses.replace(self, models=[first, *self.models[1:]])


_SERVER_KEYS = {f.name: f for f in dataclasses.fields(Config) if f.name != "models"}
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelSpec)}
_TUPLE_MODEL_KEYS = {"input_shape", "mean", "std", "batch_buckets"}


def _from_toml(data: dict[str, Any], path: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    server = data.pop("server", {})
    models = data.pop("models", None)
    if data:
        raise ConfigError(f"{path}: unknown top-level tables {sorted(data)}; expected [server] and [[models]]")
    for key, value in server.items():
        if key not in _SERVER_KEYS:
            raise ConfigError(f"{path}: unknown setting server.{key}; known: {sorted(_SERVER_KEYS)}")
        values[key] = value
    if models is not None:
        if not isinstance(models, list):
            raise ConfigError(f"{path}: models must be an array of tables ([[models]])")
        specs = []
        for i, entry in enumerate(models):
            unknown = set(entry) - _MODEL_KEYS
            if unknown:
                raise ConfigError(
                    f"{path}: models[{i}] has unknown settings {sorted(unknown)}; known: {sorted(_MODEL_KEYS)}"
                )
            entry = {k: tuple(v) if k in _TUPLE_MODEL_KEYS else v for k, v in entry.items()}
            try:
                specs.append(ModelSpec(**entry))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{path}: models[{i}]: {exc}") from None
        values["models"] = specs
    return values


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``STREAMGPU_PORT=9000`` etc.: every server setting, converted to its field's type."""
    values: dict[str, Any] = {}
    for name, f in _SERVER_KEYS.items():
        raw = env.get(f"STREAMGPU_{name.upper()}")
        if raw is None:
            continue
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        try:
            values[name] = kind(raw) if kind is not bool else raw.lower() in ("1", "true", "yes")
        except ValueError:
            raise ConfigError(f"environment STREAMGPU_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None
    return values
