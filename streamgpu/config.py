"""One Config for a server process, from a TOML file, then ``STREAMGPU_*`` environment
variables, then explicit overrides (the CLI's flags), each layer over the last.

configs/example.toml shows every setting with a comment.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamgpu.cmdline import WHOLE_DIGITS, shown
from streamgpu.errors import ConfigError
from streamgpu.files import read_toml
from streamgpu.gpu import DEVICES
from streamgpu.ingest import LISTENERS
from streamgpu.loops import LOOPS, loop_cpu_problem
from streamgpu.memory import ALIGNMENT
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import token_problem

MiB = 1024 * 1024
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}  # a socket bound to one takes the port on every address
RAW_OPTIONS = ("model", "live", "stream_id")  # a raw listener's options (streamgpu.ingest.raw)
MAX_INGEST_WORKERS = 64
MAX_BUSY_POLL_US = 1_000_000
# Below it a load sleeps over 0.1 s after each 1 ms of Python (1e-6: 1000 s): it would never end, nor would the
# process, whose exit waits for the loader thread to wake
MIN_LOADER_SHARE = 0.01

__all__ = ["Config", "ConfigError", "ListenerSpec", "TokenSpec", "typed_settings"]


@dataclass(frozen=True)
class ListenerSpec:
    """One front end: its kind (a key of ``streamgpu.ingest.LISTENERS``), address and own options."""

    kind: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 7878
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific settings, checked by the listener

    def problems(self) -> list[str]:
        out = []
        if self.kind not in LISTENERS:
            out.append(f"listener kind must be one of {sorted(LISTENERS)}, got {self.kind!r}")
        if not 0 <= self.port <= 65535:
            out.append(f"port must be 0..65535, got {self.port}")
        if self.kind in ("tcp", "http") and self.options:
            out.append(f"a {self.kind} listener takes no options, got {sorted(self.options)}")
        if self.kind == "raw":
            unknown = set(self.options) - set(RAW_OPTIONS)
            if unknown:
                out.append(f"raw listener options {sorted(unknown)} unknown; known: {list(RAW_OPTIONS)}")
            if not isinstance(self.options.get("model"), str):
                out.append("a raw listener needs options.model, the name of a configured model")
            if not isinstance(self.options.get("live", True), bool):
                out.append(f"raw listener option live must be true or false, got {self.options['live']!r}")
            stream_id = self.options.get("stream_id", 0)
            if isinstance(stream_id, bool) or not isinstance(stream_id, int) or not 0 <= stream_id <= 0xFFFFFFFF:
                out.append(f"raw listener option stream_id must be an integer 0..4294967295, got {stream_id!r}")
        return out


@dataclass(frozen=True)
class TokenSpec:
    """A named auth token: its connections form one producer and may use priorities up to ``max_priority``;
    at most ``max_connections`` of them (TCP connections, WebSockets, HTTP requests in the server) at once
    (0: only the server's ``max_connections`` bounds them), so that one token's holder cannot take every
    place under the server's cap."""

    token: str
    max_priority: int = 255
    max_connections: int = 0


@dataclass
class Config:
    """Everything a server process needs. Sizes in bytes, times in seconds unless named otherwise."""

    listeners: list[ListenerSpec] = field(default_factory=lambda: [ListenerSpec()])
    device: str = "auto"
    devices: tuple[int, ...] = (0,)  # GPU indices (cuda backend); each model runs on every one of them
    cuda_kernels: bool = True
    loop: str = "auto"
    auth_token: str = ""
    tokens: dict[str, TokenSpec] = field(default_factory=dict)
    max_priority: int = 255
    ring_bytes: int = 256 * MiB
    max_payload_bytes: int = 64 * MiB
    max_producer_ring_bytes: int = 0  # 0: a quarter of ring_bytes
    max_connections: int = 1024
    max_frames_per_connection: int = 256
    hello_timeout_s: float = 5.0
    receive_timeout_s: float = 10.0
    receive_idle_timeout_s: float = 2.0
    http_keepalive_timeout_s: float = 15.0  # an idle HTTP connection (a place under max_connections) closes after it
    # Bytes of unsent messages one WebSocket (/v1/stream) may hold: past it its oldest subscribed results are
    # dropped, and its own frames are not read further while its unsent replies hold this much.
    ws_send_queue_bytes: int = 4 * MiB
    min_receive_rate: int = 1_000_000
    max_inflight_batches: int = 2
    loop_cpu: int = -1  # the CPU the scheduling loop runs on alone (the rest of the process on the others); -1: any
    # Each process's loop polls, never asleep, this long after it wrote what will be answered soon (loops.BusyPoll):
    # lower latency at light load for a core kept busy per polling process while traffic flows. 0: off.
    busy_poll_us: int = 0
    shutdown_timeout_s: float = 10.0
    ingest_workers: int = 0  # 0: one process; N: N ingest worker processes receive TCP and UDP (ingest/workers.py)
    # A batch not done after max(watchdog_min_s, watchdog_factor x its expected time) is answered
    # INTERNAL_ERROR and its device takes no new batch until it completes.
    watchdog_factor: float = 20.0
    watchdog_min_s: float = 2.0
    log_level: str = "INFO"
    model_repository: str = ""  # a folder of models, polled: see docs/MODELS.md
    # The share of the time a model load's Python may take while frames are being served (the rest is the loop's)
    loader_share: float = 0.125
    repository_poll_s: float = 5.0
    log_format: str = "text"
    stats_interval_s: float = 60.0  # a stats line every so often; 0: none
    results_port: int = -1  # JSON-lines results subscribers' TCP port; -1: none, 0: a free one
    results_host: str = "127.0.0.1"
    results_file: str = ""  # append JSON-lines results here; "": no file
    results_top_k: int = 5  # results carry the top k (index, value) pairs; 0: the whole result
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec()])

    def __post_init__(self) -> None:
        problems = []
        if not self.listeners:
            problems.append("at least one listener is needed")
        for i, listener in enumerate(self.listeners):
            problems.extend(f"listeners[{i}]: {p}" for p in listener.problems())
        for i, listener in enumerate(self.listeners):
            if listener.kind == "udp":  # its options, checked here too so that check-config reports them
                from streamgpu.ingest.udp import listener_options  # (the module imports this one)

                try:
                    listener_options(listener, self)
                except ConfigError as exc:
                    problems.append(f"listeners[{i}]: {exc}")
        model_names = sorted(m.name for m in self.models)
        for i, listener in enumerate(self.listeners):
            model = listener.options.get("model") if listener.kind == "raw" else None
            if isinstance(model, str) and model not in model_names:
                problems.append(f"listeners[{i}]: raw listener model {model!r} is not a configured model "
                                f"(configured: {model_names})")  # fmt: skip
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            problems.append(f"busy_poll_us must be 0 (off) to {MAX_BUSY_POLL_US} (a second), got {self.busy_poll_us}")
        if self.loop_cpu < -1:
            problems.append(f"loop_cpu must be -1 (any CPU) or a CPU number, got {self.loop_cpu}")
        elif self.loop_cpu >= 0 and (why := loop_cpu_problem(self.loop_cpu)) is not None:
            problems.append(why)
        if not -1 <= self.results_port <= 65535:
            problems.append(f"results_port must be -1 (none), 0 (a free port) or 1..65535, got {self.results_port}")
        if self.results_top_k < 0:
            problems.append(f"results_top_k must be >= 0 (0: whole results), got {self.results_top_k}")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {DEVICES}, got {self.device!r}")
        self.devices = tuple(self.devices)
        if not self.devices or len(set(self.devices)) != len(self.devices) or min(self.devices) < 0:
            problems.append(f"devices must be distinct GPU indices >= 0, at least one, got {list(self.devices)}")
        if self.loop not in LOOPS:
            problems.append(f"loop must be one of {LOOPS}, got {self.loop!r}")
        if self.ring_bytes < 4096:
            problems.append(f"ring_bytes must be at least 4096, got {self.ring_bytes}")
        largest = self.ring_bytes - ALIGNMENT  # a slot is rounded up to the ring's alignment
        if not 0 < self.max_payload_bytes <= largest:
            problems.append(
                f"max_payload_bytes must be 1..ring_bytes - {ALIGNMENT} ({largest}), got {self.max_payload_bytes}"
            )
        if not 0 <= self.max_producer_ring_bytes <= self.ring_bytes:
            problems.append(
                f"max_producer_ring_bytes must be 0 (a quarter of ring_bytes) .. ring_bytes, "
                f"got {self.max_producer_ring_bytes}"
            )
        for key in ("receive_timeout_s", "receive_idle_timeout_s", "hello_timeout_s", "shutdown_timeout_s",
                    "watchdog_min_s"):  # fmt: skip
            value = getattr(self, key)
            zero = key == "shutdown_timeout_s"  # 0: answer what is queued SHUTTING_DOWN at once
            if not (math.isfinite(value) and value >= 0) or (value == 0 and not zero):
                problems.append(f"{key} must be a finite number of seconds {'>= 0' if zero else '> 0'}, got {value}")
        if not (math.isfinite(self.http_keepalive_timeout_s) and self.http_keepalive_timeout_s > 0):
            problems.append(f"http_keepalive_timeout_s must be a finite number of seconds > 0, "
                            f"got {self.http_keepalive_timeout_s}")  # fmt: skip
        if not (math.isfinite(self.loader_share) and MIN_LOADER_SHARE <= self.loader_share <= 1):
            problems.append(f"loader_share must be a fraction of the time in [{MIN_LOADER_SHARE}, 1] (1: loads never "
                            f"pause; below {MIN_LOADER_SHARE} a load pauses for over 0.1 s at a time), "
                            f"got {self.loader_share}")  # fmt: skip
        if not (math.isfinite(self.watchdog_factor) and self.watchdog_factor >= 1):
            problems.append(f"watchdog_factor must be a finite number >= 1, got {self.watchdog_factor}")
        if self.min_receive_rate < 1:
            problems.append(f"min_receive_rate must be >= 1 byte/s, got {self.min_receive_rate}")
        if self.ws_send_queue_bytes < 1:
            problems.append(f"ws_send_queue_bytes must be >= 1 byte, got {self.ws_send_queue_bytes}")
        if self.max_connections < 1:
            problems.append(f"max_connections must be >= 1, got {self.max_connections}")
        if not 0 <= self.max_priority <= 255:
            problems.append(f"max_priority must be 0..255, got {self.max_priority}")
        if (why := token_problem(self.auth_token)) is not None:
            problems.append(f"auth_token {why}")
        for name, grant in self.tokens.items():
            if not grant.token:
                problems.append(f"tokens.{name}: token must not be empty")
            if (why := token_problem(grant.token)) is not None:
                problems.append(f"tokens.{name}: token {why}")
            if not 0 <= grant.max_priority <= 255:
                problems.append(f"tokens.{name}: max_priority must be 0..255, got {grant.max_priority}")
            if grant.max_connections < 0:
                problems.append(f"tokens.{name}: max_connections must be >= 0 (0: no cap of its own), "
                                f"got {grant.max_connections}")  # fmt: skip
            if grant.token == self.auth_token:
                problems.append(f"tokens.{name}: token equals auth_token; give each identity its own token")
        if len({g.token for g in self.tokens.values()}) != len(self.tokens):
            problems.append("tokens must differ from each other")
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if not (math.isfinite(self.stats_interval_s) and self.stats_interval_s >= 0):
            problems.append(f"stats_interval_s must be a finite number of seconds >= 0, got {self.stats_interval_s}")
        if self.max_frames_per_connection < 1 or self.max_inflight_batches < 1:
            problems.append("max_frames_per_connection and max_inflight_batches must be >= 1")
        if not self.models and not self.model_repository:
            problems.append("at least one model is needed (or a model_repository)")
        if not (math.isfinite(self.repository_poll_s) and self.repository_poll_s > 0):
            problems.append(f"repository_poll_s must be a finite number of seconds > 0, got {self.repository_poll_s}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            problems.append(f"model names must be unique, got {names}")
        shared = {m.name: m.sm_share for m in self.models if m.sm_share}
        if sum(shared.values()) > 1 + 1e-9:
            problems.append(f"the models' sm_share values add up to {sum(shared.values()):g} ({shared}): every model "
                            "has a replica on each GPU, so they must add up to at most 1.0")  # fmt: skip
        for m in self.models:
            problems.extend(self.model_problems(m))
        problems.extend(self._worker_problems())
        problems.extend(self._shared_port_problems())
        if problems:
            raise ConfigError("; ".join(problems))

    def _shared_port_problems(self) -> list[str]:
        """Two TCP sockets of this config on one address: the second bind would fail only after the models
        loaded, in asyncio's words, naming neither setting."""
        users = [(f"listeners[{i}] ({spec.kind})", spec.host, spec.port) for i, spec in enumerate(self.listeners)
                 if spec.kind != "udp"]  # fmt: skip
        if self.results_port > 0:
            users.append(("results_port", self.results_host, self.results_port))
        out = []
        for at, (name, host, port) in enumerate(users):
            for other, other_host, other_port in users[:at]:
                if port and port == other_port and (host == other_host or {host, other_host} & WILDCARD_HOSTS):
                    out.append(f"{name} and {other} both use port {port} on {host}: give each its own port")
        return out

    def file_problems(self) -> list[str]:
        """The files this config names that cannot be read: the models' sources, the model_repository folder.
        Not checked with the settings: serve finds them as it loads (a repository may appear later); check-config
        reports them. Nothing is loaded."""
        out = [f"model {m.name!r}: {why}" for m in self.models if (why := m.source_file_problem()) is not None]
        folder = self.model_repository
        if folder and not os.path.isdir(folder):
            out.append(
                f"model_repository {folder!r} {'is not a folder' if os.path.exists(folder) else 'does not exist'}"
            )
        elif folder and not os.access(folder, os.R_OK | os.X_OK):
            out.append(f"model_repository {folder!r} cannot be read (permission denied)")
        return out

    def model_problems(self, m: ModelSpec) -> list[str]:
        """Why this server cannot serve model ``m`` (its settings against the server's): the config's models are
        checked so, and every model loaded while serving (``ModelManager``)."""
        out = []
        if m.frame_nbytes > self.max_payload_bytes:
            out.append(f"model {m.name!r} frames ({m.frame_nbytes} bytes) exceed max_payload_bytes")
        slot = -(-m.frame_nbytes // ALIGNMENT) * ALIGNMENT  # a frame's place in the ring
        # Whole frames the ring holds at once: with ingest workers, each share (a worker's range, this process's
        # listeners') holds its own, none across two
        fits = self._ring_shares * (self.worker_ring_bytes // slot)
        if m.frame_nbytes <= self.max_payload_bytes and m.max_batch_size > fits:
            # A batch's frames are all in the ring until its copy has read them, so no larger batch can form;
            # yet every batch buffer set (device staging, page-locked outputs) is allocated for max_batch_size
            # frames, and the load warms up a batch that size: a typo's 1000000 failed deep in torch
            ring = f"ring_bytes ({self.ring_bytes})"
            if self.ingest_workers:
                ring = (f"the {self._ring_shares} shares of ring_bytes ({self.ring_bytes}) with ingest workers, "
                        f"{self.worker_ring_bytes} bytes each")  # fmt: skip
            out.append(
                f"model {m.name!r}: max_batch_size ({m.max_batch_size}) frames of {m.frame_nbytes} bytes take "
                f"{m.max_batch_size * slot} bytes of the ring at once, more than {ring} holds: a batch's frames are "
                f"in the ring together; set max_batch_size to at most {fits} or raise ring_bytes"
            )
        if self.max_frames_per_connection >= m.max_queue:
            out.append(
                f"max_frames_per_connection ({self.max_frames_per_connection}) must be below model "
                f"{m.name!r}'s max_queue ({m.max_queue}): one connection must not be able to fill a queue"
            )
        return out

    def _worker_problems(self) -> list[str]:
        if self.ingest_workers == 0:
            return []
        if not 0 < self.ingest_workers <= MAX_INGEST_WORKERS:
            return [f"ingest_workers must be 0..{MAX_INGEST_WORKERS}, got {self.ingest_workers}"]
        out = []
        kinds = [listener.kind for listener in self.listeners]
        if kinds.count("tcp") != 1:
            out.append(f"ingest_workers > 0: the workers serve one tcp listener (and any udp ones); configure exactly"
                       f" one, got listener kinds {kinds}")  # fmt: skip
        shares = f"ring_bytes / {self._ring_shares}"
        if self.worker_ring_bytes < 4096:
            out.append(f"{shares} (one ingest worker's share of the ring) must be at least 4096, got"
                       f" {self.worker_ring_bytes}")  # fmt: skip
        largest = self.worker_ring_bytes - ALIGNMENT
        if self.max_payload_bytes > largest:
            out.append(
                f"max_payload_bytes ({self.max_payload_bytes}) must fit one ingest worker's share of the ring:"
                f" {shares} - {ALIGNMENT} = {largest}"
            )
        return out

    @property
    def _ring_shares(self) -> int:
        """Ring shares with ingest workers: one per worker, and one for the listeners of this process (kinds
        other than tcp and udp: http, raw) when there are any."""
        in_process = any(listener.kind not in ("tcp", "udp") for listener in self.listeners)
        return max(1, self.ingest_workers) + (1 if in_process and self.ingest_workers else 0)

    @property
    def worker_ring_bytes(self) -> int:
        """Ring bytes each ingest worker receives into (its own range of the segment)."""
        return (self.ring_bytes // self._ring_shares) & ~(ALIGNMENT - 1)

    @property
    def sweep_period_s(self) -> float:
        """How often listeners' time limits are enforced: about four times per shortest limit."""
        return min(1.0, self.receive_timeout_s / 4, self.hello_timeout_s / 4)

    @property
    def producer_ring_bytes(self) -> int:
        """Ring bytes one producer may hold at once. With ingest workers, within one share of the ring: each
        worker's limit is scaled to its range, and the listeners of this process (http, raw) receive into one
        share too, so one of their producers cannot fill it alone."""
        if not self.ingest_workers:
            return self.max_producer_ring_bytes or self.ring_bytes // 4
        share = self.worker_ring_bytes
        return min(self.max_producer_ring_bytes, share) if self.max_producer_ring_bytes else share // 4

    @property
    def open_to_anyone(self) -> bool:
        """Whether a listener binds beyond loopback while no token is needed to submit frames."""
        public = [listener for listener in self.listeners if listener.host not in LOOPBACK_HOSTS]
        # a raw listener has no handshake to carry a token: open to anyone whatever the tokens
        if any(listener.kind == "raw" for listener in public):
            return True
        return bool(public) and not (self.auth_token or self.tokens)

    @classmethod
    def load(cls, path: str | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """File, then environment, then ``overrides`` (None values are ignored)."""
        values: dict[str, Any] = {}
        if path:
            try:
                data = read_toml(path, f"config file {path!r}")
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
            values.update(_from_toml(data, path))
        values.update(_from_env(os.environ if env is None else env))
        model_source = overrides.pop("model", None)
        model_fields = overrides.pop("first_model", None) or {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)} - set(_ADDRESS_KEYS)
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        values = typed_settings(cls, values, "server.", _ADDRESS_TYPES)
        # named here: the listener these shortcuts make would be reported only as listeners[N]
        bad_ports = [f"{k} must be 0..65535, got {values[k]}" for k in ("port", "http_port", "udp_port")
                     if k in values and not 0 <= values[k] <= 65535]  # fmt: skip
        if bad_ports:
            raise ConfigError("; ".join(bad_ports))
        address = {k: values.pop(k) for k in ("host", "port") if k in values}
        http_port = values.pop("http_port", None)
        udp_port = values.pop("udp_port", None)
        if address:  # host/port (file, STREAMGPU_HOST/PORT, --host/--port) address the first listener
            listeners = list(values.get("listeners") or [ListenerSpec()])
            listeners[0] = dataclasses.replace(listeners[0], **address)
            values["listeners"] = listeners
        if udp_port is not None:  # udp_port (file, STREAMGPU_UDP_PORT, --udp-port): one more listener, UDP
            listeners = list(values.get("listeners") or [ListenerSpec()])
            values["listeners"] = [*listeners, ListenerSpec(kind="udp", host=listeners[0].host, port=udp_port)]
        if http_port is not None:  # http_port (file, STREAMGPU_HTTP_PORT, --http-port): the http listener's port
            listeners = list(values.get("listeners") or [ListenerSpec()])
            at = next((i for i, spec in enumerate(listeners) if spec.kind == "http"), None)
            if at is None:
                listeners.append(ListenerSpec(kind="http", host=listeners[0].host, port=http_port))
            else:
                listeners[at] = dataclasses.replace(listeners[at], port=http_port)
            values["listeners"] = listeners
        try:
            config = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        if model_source:
            model_fields = {"source": model_source, **model_fields}
        if model_fields:
            config = config.with_first_model(**model_fields)
        return config

    def with_listeners(self, extra: list[ListenerSpec]) -> Config:
        """This config with ``extra`` listeners after its own (ConfigError when they are invalid)."""
        try:
            return dataclasses.replace(self, listeners=[*self.listeners, *extra])
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None

    def with_default_model_source(self, source: str) -> Config:
        """Serve ``source`` (``builtin:resnet50``, ``torchscript:model.pt``...) as the first model."""
        return self.with_first_model(source=source)

    def with_first_model(self, **fields: Any) -> Config:
        """The first model with ``fields`` replaced (the CLI's model flags: source, name, input shape, dtype).

        When the frame's shape or dtype changes and ``preprocess`` is not given, it follows the
        frame: ``image`` for uint8 ``[H, W, C]`` frames, ``none`` for any other tensor.
        """
        first = self.models[0]
        fields = typed_settings(ModelSpec, {k: v for k, v in fields.items() if v is not None}, "models[0].")
        if ("input_shape" in fields or "input_dtype" in fields) and "preprocess" not in fields:
            shape = fields.get("input_shape", first.input_shape)
            dtype = fields.get("input_dtype", first.input_dtype)
            fields["preprocess"] = "image" if dtype == "uint8" and len(shape) == 3 else "none"
        channels = fields.get("input_shape", first.input_shape)[-1]
        if fields.get("preprocess") == "image" and len(first.mean) != channels:  # flags cannot give mean/std
            fields = {"mean": (0.5,) * channels, "std": (0.5,) * channels, **fields}
        try:
            new = dataclasses.replace(first, **fields)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return dataclasses.replace(self, models=[new, *self.models[1:]])

    def resolved(self) -> dict[str, Any]:
        """Every setting as plain data (what ``streamgpu check-config`` prints), token values masked."""
        data = dataclasses.asdict(self)
        data["auth_token"] = _mask(self.auth_token)
        for grant in data["tokens"].values():
            grant["token"] = _mask(grant["token"])
        return data


# Shortcuts: the first listener's address; the ports of an http and a udp listener.
_ADDRESS_KEYS = {"host": "", "port": 0, "http_port": 0, "udp_port": 0}
_ADDRESS_TYPES = {"host": str, "port": int, "http_port": int, "udp_port": int}
_SERVER_KEYS: dict[str, Any] = {
    **{f.name: f.default for f in dataclasses.fields(Config) if f.name not in ("models", "listeners", "tokens")},
    **_ADDRESS_KEYS,
}
_TABLE_KEYS = ("listeners", "tokens")
ENV_PREFIX = "STREAMGPU_"
# One name for one token: the server's auth_token, and the token `streamgpu send` and `streamgpu admin` present
AUTH_TOKEN_ENV = f"{ENV_PREFIX}AUTH_TOKEN"
OLD_TOKEN_ENV = f"{ENV_PREFIX}TOKEN"  # send's name for it before: still read by send, with a warning (deprecated)
# The STREAMGPU_ variables that set no [server] setting: read elsewhere, so not refused as typos
OTHER_ENV = (OLD_TOKEN_ENV,)
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelSpec)}


def _from_toml(data: dict[str, Any], path: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    server = data.pop("server", {})
    models = data.pop("models", None)
    if data:
        raise ConfigError(f"{path}: unknown top-level tables {sorted(data)}; expected [server] and [[models]]")
    if not isinstance(server, dict):
        raise ConfigError(f"{path}: server must be a table ([server]), got {server!r} ({type(server).__name__})")
    for key, value in server.items():
        if key == "listeners":
            values[key] = _tables(value, ListenerSpec, f"{path}: server.listeners", array=True)
        elif key == "tokens":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: server.tokens must be tables ([server.tokens.NAME])")
            tables = _tables(list(value.values()), TokenSpec, f"{path}: server.tokens", names=list(value))
            values[key] = dict(zip(value, tables, strict=True))
        elif key in _SERVER_KEYS:
            values[key] = value
        else:
            known = sorted([*_SERVER_KEYS, *_TABLE_KEYS])
            raise ConfigError(f"{path}: unknown setting server.{key}{_did_you_mean([key], known)}; known: {known}")
    if models is not None:
        if not isinstance(models, list):
            raise ConfigError(f"{path}: models must be an array of tables ([[models]])")
        values["models"] = [model_spec(entry, f"{path}: models[{i}]") for i, entry in enumerate(models)]
    return values


def model_spec(entry: Any, where: str, **fixed: Any) -> ModelSpec:
    """A ``ModelSpec`` from one table of settings (TOML ``[[models]]``, a repository's config.toml, an
    admin request's JSON), ``fixed`` overriding it; ``ConfigError`` names ``where`` and the setting."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: model settings must be a table of settings")
    unknown = set(entry) - _MODEL_KEYS
    if unknown:
        raise ConfigError(
            f"{where} has unknown settings {sorted(unknown)}{_did_you_mean(unknown, _MODEL_KEYS)}; "
            f"known: {sorted(_MODEL_KEYS)}"
        )
    values = typed_settings(ModelSpec, entry, f"{where}.")
    for key, value in fixed.items():  # (a name given twice, as the URL's and in the body, must agree)
        if key in values and values[key] != value:
            raise ConfigError(f"{where}: {key} is {value!r} here; leave {key} = {values[key]!r} out of the settings")
    try:
        return ModelSpec(**{**values, **fixed})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _tables(entries: Any, cls: type[Any], where: str, array: bool = False, names: list[str] | None = None) -> list[Any]:
    """``[[server.listeners]]`` / ``[server.tokens.NAME]`` tables -> ListenerSpec / TokenSpec objects; errors
    name a table by its index, or by its name from ``names``."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        shape = "an array of tables ([[server.listeners]])" if array else "tables ([server.tokens.NAME])"
        raise ConfigError(f"{where} must be {shape}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    out = []
    for i, entry in enumerate(entries):
        label = f"{where}.{names[i]}" if names else f"{where}[{i}]"
        unknown = set(entry) - known
        if unknown:
            raise ConfigError(
                f"{label} has unknown settings {sorted(unknown)}{_did_you_mean(unknown, known)}; known: {sorted(known)}"
            )
        missing = [name for name in required if name not in entry]
        if missing:
            raise ConfigError(f"{label}: {', '.join(missing)} is required")
        out.append(cls(**typed_settings(cls, entry, f"{label}.")))
    return out


def _did_you_mean(unknown: typing.Iterable[str], known: typing.Iterable[str], prefix: str = "") -> str:
    """' (did you mean 'port'?)' for the known names close to unknown ones (typos); '' when none is. ``prefix``
    goes before each name shown (compared without it: a prefix all names share makes any two look close)."""
    close = [
        prefix + match[0] for name in sorted(unknown) if (match := difflib.get_close_matches(name, list(known), n=1))
    ]
    return f" (did you mean {' or '.join(repr(name) for name in close)}?)" if close else ""


def check_env_names(env: Mapping[str, str]) -> None:
    """A ConfigError for any ``STREAMGPU_`` variable in ``env`` that names no setting (but those of ``OTHER_ENV``),
    or a known one in another case, with the closest known name: a typo must not be ignored. The server and
    ``streamgpu send`` both check their environment so."""
    names = {name.upper() for name in _SERVER_KEYS}
    known = names | {var.removeprefix(ENV_PREFIX) for var in OTHER_ENV}

    def mistyped(var: str) -> bool:
        if var in OTHER_ENV:
            return False
        if var.startswith(ENV_PREFIX):
            return var.removeprefix(ENV_PREFIX) not in names
        # another case (streamgpu_port) is refused only where it names a known variable: else it is someone else's
        return var.upper().startswith(ENV_PREFIX) and var.upper().removeprefix(ENV_PREFIX) in known

    unknown = sorted(filter(mistyped, env))
    if unknown:
        hint = _did_you_mean([var.upper().removeprefix(ENV_PREFIX) for var in unknown], known, ENV_PREFIX)
        hint = hint.replace(repr(OLD_TOKEN_ENV), repr(AUTH_TOKEN_ENV))  # (the deprecated name is read, not suggested)
        raise ConfigError(f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{hint}: "
                          f"{ENV_PREFIX}<SETTING> sets a [server] setting (configs/example.toml lists them); fix the "
                          "name or unset it")  # fmt: skip


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``STREAMGPU_PORT=9000`` etc.: every scalar server setting, parsed as its field's type, once
    ``check_env_names`` found no typo."""
    check_env_names(env)
    values: dict[str, Any] = {}
    for name in _SERVER_KEYS:
        var = f"{ENV_PREFIX}{name.upper()}"
        raw = env.get(var)
        if raw is None:
            continue
        kind = _ADDRESS_TYPES.get(name) or _field_types(Config)[name]
        try:
            values[name] = _parse_text(kind, raw)
        except ValueError:
            whole = f" of at most {WHOLE_DIGITS} digits" if int in (kind, *typing.get_args(kind)) else ""
            raise ConfigError(f"environment {var}={shown(raw)}: {name} must be {_describe(kind)}{whole}") from None
    return values


# -- type checks driven by the dataclasses' field types: TOML, environment and flags all pass here --

_SCALARS: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_ELEMENTS: dict[Any, str] = {int: "integers", float: "numbers", str: "strings"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _field_types(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return f"a list of {_ELEMENTS.get(typing.get_args(kind)[0], 'values')}"
    origin = typing.get_origin(kind) or kind
    return _SCALARS.get(origin) or {list: "an array of tables", dict: "a table"}.get(origin, str(kind))


def _fits(kind: Any, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)  # strict: 1 or "yes" is not a boolean in a TOML file
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # (an int past float's range, which TOML and JSON read, would make float() raise OverflowError)
        return isinstance(value, float) or (_fits(int, value) and abs(value) <= sys.float_info.max)
    if kind is str:
        return isinstance(value, str)
    origin = typing.get_origin(kind)
    if origin is tuple:
        element = typing.get_args(kind)[0]
        return isinstance(value, list | tuple) and all(_fits(element, v) for v in value)
    return isinstance(value, origin or object)


def _convert(kind: Any, value: Any) -> Any:
    if kind is float:
        return float(value)
    if typing.get_origin(kind) is tuple:
        return tuple(_convert(typing.get_args(kind)[0], v) for v in value)
    return value


def _parse_text(kind: Any, raw: str) -> Any:
    """An environment variable's text as ``kind`` (ValueError when it is not one)."""
    if kind is bool:
        if raw.strip().lower() in _TRUE + _FALSE:
            return raw.strip().lower() in _TRUE
        raise ValueError(raw)
    if kind is int and len(raw.strip().lstrip("+-").lstrip("0")) > WHOLE_DIGITS:  # (int() refuses past 4300)
        raise ValueError(raw)
    if kind in (int, float):
        return kind(raw)
    if typing.get_origin(kind) is tuple:  # STREAMGPU_DEVICES=0,1
        element = typing.get_args(kind)[0]
        return tuple(_parse_text(element, part.strip()) for part in raw.split(",") if part.strip())
    return raw


def typed_settings(
    cls: type[Any], values: Mapping[str, Any], where: str = "", extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``values`` checked against ``cls``'s dataclass field types (and ``extra`` names' types); ints become
    floats, lists tuples where the field says so. A ConfigError names every setting of the wrong type and
    the type it needs."""
    kinds = {**_field_types(cls), **(extra or {})}
    out, problems = {}, []
    for name, value in values.items():
        kind = kinds.get(name)
        if kind is None or _fits(kind, value):
            out[name] = value if kind is None else _convert(kind, value)
        else:
            problems.append(f"{where}{name} must be {_describe(kind)}, got {value!r} ({type(value).__name__})")
    if problems:
        raise ConfigError("; ".join(problems))
    return out


def _mask(token: str) -> str:
    return "***" if token else ""
