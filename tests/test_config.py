"""Config: file < environment < overrides, and a clear error for every bad setting."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from streamgpu.config import Config, ConfigError, ListenerSpec, TokenSpec

EXAMPLE = Path(__file__).parent.parent / "configs" / "example.toml"


def test_example_config_loads_and_matches_defaults() -> None:
    assert Config.load(str(EXAMPLE), env={}) == Config()


def test_example_config_shows_every_setting_and_no_other() -> None:
    # the reference for settings (README, config.py): a setting added without it, or one renamed, fails here
    from streamgpu.config import _ADDRESS_KEYS, RAW_OPTIONS
    from streamgpu.ingest.udp import UdpOptions
    from streamgpu.models.spec import ModelSpec

    text = EXAMPLE.read_text()
    shown = set(re.findall(r"^#? ?([a-z_]+) = ", text, re.M)) | set(re.findall(r"options\.([a-z_]+)", text))
    udp = {f.name for f in dataclasses.fields(UdpOptions)}
    settings = {f.name for cls in (Config, ModelSpec, ListenerSpec, TokenSpec) for f in dataclasses.fields(cls)}
    every = (settings - {"models", "listeners", "tokens"}) | set(_ADDRESS_KEYS) | set(RAW_OPTIONS) | udp
    assert every - shown == set() and shown - every == set()
    commented = dict(re.findall(r"^# ([a-z_]+) = (\S+)", text, re.M))  # the udp options' defaults
    for name in udp - {"allow"}:  # allow's default (empty) is written out as the loopback networks it means
        assert tomllib.loads(f"v = {commented[name]}")["v"] == getattr(UdpOptions(), name), name


def test_environment_then_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 1000\nhost = "0.0.0.0"\n')
    cfg = Config.load(str(path), env={"STREAMGPU_PORT": "2000", "STREAMGPU_AUTH_TOKEN": "t"}, host=None, device="cpu")
    first = cfg.listeners[0]
    assert (first.port, first.host, cfg.auth_token, cfg.device) == (2000, "0.0.0.0", "t", "cpu")
    assert Config.load(str(path), env={"STREAMGPU_PORT": "2000"}, port=3000).listeners[0].port == 3000


def test_listeners_and_named_tokens_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nport = 9000\n[[server.listeners]]\nkind = "tcp"\nport = 1\n[[server.listeners]]\nport = 2\n'
        '[server.tokens.fleet]\ntoken = "t1"\nmax_priority = 200\nmax_connections = 16\n'
    )
    cfg = Config.load(str(path), env={})
    assert [(ls.kind, ls.port) for ls in cfg.listeners] == [("tcp", 9000), ("tcp", 2)]  # port: the first's
    assert cfg.tokens == {"fleet": TokenSpec("t1", 200, max_connections=16)}


def test_binding_beyond_loopback_without_a_token_is_noticed() -> None:
    assert not Config().open_to_anyone
    assert Config(listeners=[ListenerSpec(host="0.0.0.0")]).open_to_anyone
    assert not Config(listeners=[ListenerSpec(host="0.0.0.0")], auth_token="x").open_to_anyone


def test_raw_listeners_and_results_settings_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nresults_port = 0\nresults_file = "r.jsonl"\nresults_top_k = 0\n'
        '[[server.listeners]]\nport = 1\n[[server.listeners]]\nkind = "raw"\nport = 2\n'
        'options = { model = "default", live = false }\n'
    )
    cfg = Config.load(str(path), env={"STREAMGPU_RESULTS_PORT": "9001"})
    assert cfg.listeners[1] == ListenerSpec("raw", "127.0.0.1", 2, {"model": "default", "live": False})
    assert (cfg.results_port, cfg.results_file, cfg.results_top_k) == (9001, "r.jsonl", 0)


def test_a_raw_port_beyond_loopback_is_open_whatever_the_tokens() -> None:
    raw = ListenerSpec("raw", "0.0.0.0", 9000, {"model": "default"})
    assert Config(listeners=[ListenerSpec(), raw], auth_token="x").open_to_anyone
    assert not Config(
        listeners=[ListenerSpec(), ListenerSpec("raw", port=9000, options={"model": "default"})]
    ).open_to_anyone


def test_extra_listeners_are_checked_like_the_others() -> None:
    cfg = Config().with_listeners([ListenerSpec("raw", port=0, options={"model": "default"})])
    assert [ls.kind for ls in cfg.listeners] == ["tcp", "raw"]
    with pytest.raises(ConfigError, match=r"listeners\[1\]: raw listener model 'cam' is not a configured model"):
        Config().with_listeners([ListenerSpec("raw", port=0, options={"model": "cam"})])


def test_model_flag_replaces_the_first_models_source() -> None:
    cfg = Config.load(None, env={}, model="builtin:resnet18")
    assert cfg.models[0].source == "builtin:resnet18" and cfg.models[0].name == "default"


def test_models_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[models]]\nname = "a"\ninput_shape = [32, 32, 3]\n[[models]]\nname = "b"\nsource = "builtin:resnet18"\n'
    )
    cfg = Config.load(str(path), env={})
    assert [m.name for m in cfg.models] == ["a", "b"] and cfg.models[0].input_shape == (32, 32, 3)


SECOND_LISTENER = '[[server.listeners]]\nkind = "tcp"\n[[server.listeners]]\n'  # listeners[1] is what follows


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nprot = 1\n", "unknown setting server.prot (did you mean 'port'?)"),  # a typo: the close match
        ("[[models]]\ninput_shpe = [8]\n", "unknown settings ['input_shpe'] (did you mean 'input_shape'?)"),
        ("[[server.listeners]]\nprt = 1\n", "unknown settings ['prt'] (did you mean 'port'?)"),
        ("[server]\nport = 70000\n", "port must be 0..65535"),
        ('[server]\ndevice = "tpu"\n', "device must be one of"),
        ("[server]\nring_bytes = 100000\nmax_payload_bytes = 200000\n", "max_payload_bytes must be"),
        (  # (a batch's frames are in the ring together: buffers for 1000000 failed deep in torch at load)
            "[[models]]\nname = 'cam'\nmax_queue = 1000000\nmax_batch_size = 1000000\n",
            "model 'cam': max_batch_size (1000000) frames of 150528 bytes take 150528000000 bytes of the ring at once,"
            " more than ring_bytes (268435456) holds: a batch's frames are in the ring together; set max_batch_size "
            "to at most 1783 or raise ring_bytes",
        ),
        (  # frames rounded up to the ring's 256-byte alignment: 12 frames of 300 bytes take 12 * 512
            "[server]\nring_bytes = 6000\nmax_payload_bytes = 4096\n[[models]]\ninput_shape = [10, 10, 3]\n"
            "max_batch_size = 12\n",
            "max_batch_size (12) frames of 300 bytes take 6144 bytes of the ring at once, more than ring_bytes (6000)",
        ),
        ("[serve]\nport = 1\n", "unknown top-level tables"),
        ('[[models]]\nname = "a"\n[[models]]\nname = "a"\n', "model names must be unique"),
        ('[[models]]\nsource = "ftp://x"\n', "source 'ftp://x' must be"),
        ("[[models]]\ninput_shape = [224, 224]\n", "needs uint8 frames of shape [H, W, C]"),
        ('[[models]]\ninput_dtype = "complex64"\n', "not a supported dtype"),
        ("[[models]]\ncolour = 1\n", "unknown settings ['colour']"),
        ("port = [\n", "not valid TOML"),
        ('[[server.listeners]]\nkind = "carrier-pigeon"\n', "listener kind must be one of"),
        ("[[server.listeners]]\nspeed = 1\n", "unknown settings ['speed']"),
        ('[server.tokens.a]\ntoken = ""\n', "tokens.a: token must not be empty"),
        # (no HELLO carries a longer token: no TCP producer could ever be admitted)
        (f'[server]\nauth_token = "{"t" * 1025}"\n', "auth_token must be at most 1024 UTF-8 bytes"),
        ('[server.tokens.a]\ntoken = "' + "\u00e9" * 513 + '"\n', "tokens.a: token must be at most 1024 UTF-8 bytes"),
        ("[server]\nmax_frames_per_connection = 5000\n", "must be below model 'default''s max_queue"),
        ("[server]\nmin_receive_rate = 0\n", "min_receive_rate must be >= 1"),
        ("[server]\nhello_timeout_s = nan\n", "hello_timeout_s must be a finite number of seconds"),
        ("[server]\nloader_share = 0\n", "loader_share must be a fraction of the time in [0.01, 1]"),
        ("[server]\nloader_share = 1.5\n", "loader_share must be a fraction of the time in [0.01, 1]"),
        ("[server]\nloader_share = nan\n", "loader_share must be a fraction of the time in [0.01, 1]"),
        # a tinier share pauses a load for seconds (1e-6: 1000 s) after each millisecond: the load never ends, and
        # the process cannot exit until its loader thread wakes (1e-300: the pause overflows, the load fails)
        ("[server]\nloader_share = 1e-6\n", "loader_share must be a fraction of the time in [0.01, 1]"),
        ("[server]\nloader_share = 1e-300\n", "loader_share must be a fraction of the time in [0.01, 1]"),
        ("[[models]]\ndefault_deadline_ms = inf\n", "default_deadline_ms must be a finite number"),
        ("[[models]]\nmax_batch_size = 100000\n", "max_batch_size (100000) must be at most max_queue (1024)"),
        # wrong types name the setting and the type it needs (used to be a TypeError from a comparison)
        ('[server]\nport = "7883"\n', "server.port must be an integer, got '7883' (str)"),
        ("[server]\ncuda_kernels = 1\n", "server.cuda_kernels must be true or false, got 1 (int)"),
        ('[server]\nhello_timeout_s = "5"\n', "server.hello_timeout_s must be a number"),
        ("[[models]]\nmean = 0.5\n", "models[0].mean must be a list of numbers, got 0.5 (float)"),
        ('[[models]]\ninput_shape = ["a"]\n', "models[0].input_shape must be a list of integers"),
        ('[[models]]\ncuda_graphs = "yes"\n', "models[0].cuda_graphs must be true or false"),
        ('[[server.listeners]]\nport = "1"\n', "server.listeners[0].port must be an integer"),
        ("[server.tokens.a]\ntoken = 5\n", "server.tokens.a.token must be a string"),
        ('[server]\nlog_format = "xml"\n', "log_format must be one of"),
        ('[[server.listeners]]\nkind = "raw"\n', "a raw listener needs options.model"),
        ('[[server.listeners]]\nkind = "raw"\noptions = { model = "x" }\n', "raw listener model 'x' is not a"),
        ('[[server.listeners]]\nkind = "raw"\noptions = { model = "default", live = 1 }\n', "live must be true or"),
        ('[[server.listeners]]\nkind = "raw"\noptions = { model = "default", stream_id = -1}\n', "stream_id must be"),
        ('[[server.listeners]]\nkind = "raw"\noptions = { model = "default", fps = 1 }\n', "options ['fps'] unknown"),
        ("[server]\nresults_port = -2\n", "results_port must be -1"),
        ("[server]\nresults_top_k = -1\n", "results_top_k must be >= 0"),
        ("[server]\nws_send_queue_bytes = 0\n", "ws_send_queue_bytes must be >= 1 byte"),
        ('[server]\nws_send_queue_bytes = "4M"\n', "server.ws_send_queue_bytes must be an integer"),
        # listener options are checked with the config: check-config must report them, not only serve
        (
            SECOND_LISTENER + 'kind = "udp"\noptions = { bogus = 1 }\n',
            "listeners[1]: udp listener: unknown options ['bogus']",
        ),
        (
            SECOND_LISTENER + 'kind = "udp"\noptions = { batch = 0 }\n',
            "listeners[1]: udp listener: batch must be an integer in 1..1024",
        ),
        (
            SECOND_LISTENER + 'kind = "tcp"\nport = 7879\noptions = { bogus = 1 }\n',
            "listeners[1]: a tcp listener takes no options",
        ),
        (
            SECOND_LISTENER + 'kind = "http"\noptions = { bogus = 1 }\n',
            "listeners[1]: a http listener takes no options",
        ),
        # misshapen server tables are named
        ("server = 5\n", "server must be a table ([server]), got 5 (int)"),
        ("[[server]]\nport = 1\n", "server must be a table ([server]), got [{'port': 1}] (list)"),
        ("[server.tokens.cam]\nmax_priority = 5\n", "server.tokens.cam: token is required"),
        ("[server.tokens.cam]\ntokn = 'x'\n", "server.tokens.cam has unknown settings ['tokn']"),
        (
            "[server.tokens.cam]\ntoken = 'x'\nmax_connections = -1\n",
            "tokens.cam: max_connections must be >= 0 (0: no cap of its own), got -1",
        ),
        ("[server.tokens.cam]\ntoken = 'x'\nmax_connections = '4'\n", "server.tokens.cam.max_connections"),
        ("[server]\nloop_cpu = -2\n", "loop_cpu must be -1 (any CPU) or a CPU number, got -2"),
        ("[server]\nbusy_poll_us = -1\n", "busy_poll_us must be 0 (off) to 1000000 (a second), got -1"),
        ("[server]\nbusy_poll_us = 2000000\n", "busy_poll_us must be 0 (off) to 1000000 (a second), got 2000000"),
        ("[server]\nloop_cpu = 100000\n", "loop_cpu = 100000: this process may run on CPUs"),
        (
            '[[models]]\nname = "a"\nsm_share = 0.6\n[[models]]\nname = "b"\nsm_share = 0.5\n',
            "the models' sm_share values add up to 1.1 ({'a': 0.6, 'b': 0.5})",
        ),
        ("[[models]]\ninstances = 0\n", "instances must be 1..8 copies of the model per GPU, got 0"),
        (
            "[[models]]\ninstances = 2\nsm_share = 0.5\n",
            "instances = 2 with sm_share = 0.5: a share holds one instance; set instances = 1",
        ),
    ],
)
def test_bad_settings_say_what_to_fix(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.load(str(path), env={})


def test_a_config_file_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    # TOML is UTF-8: tomllib raises UnicodeDecodeError (not TOMLDecodeError), which was a traceback
    path = tmp_path / "c.toml"
    path.write_bytes(b'[server]\nauth_token = "caf\xe9"\n')  # Latin-1
    with pytest.raises(ConfigError, match=r"c.toml' is not valid TOML: 'utf-8' codec can't decode"):
        Config.load(str(path), env={})


def test_a_config_file_with_an_integer_of_thousands_of_digits_is_refused(tmp_path: Path) -> None:
    # tomllib lets int()'s ValueError through (past Python's 4300 digits): a traceback, not a ConfigError
    path = tmp_path / "c.toml"
    path.write_text(f"[server]\nport = {'9' * 5000}\n")
    with pytest.raises(ConfigError, match=r"c.toml' is not valid TOML: Exceeds the limit \(4300 digits\)"):
        Config.load(str(path), env={})


@pytest.mark.parametrize(
    "toml",
    [
        "a = " + "[" * 100_000 + "]" * 100_000,
        "a = " + "{b = " * 100_000 + "1" + "}" * 100_000,
        "[server.port." + ".".join(["a"] * 5000) + "]\n",  # parses: the message showing port's value recursed
        "[[models]]\n[models.input_shape." + ".".join(["a"] * 5000) + "]\n",
    ],
    ids=["arrays", "inline-tables", "server-tables", "model-tables"],
)
def test_a_config_file_nested_past_the_recursion_limit_says_so(tmp_path: Path, toml: str) -> None:
    # tomllib recurses for each nested array or inline table: RecursionError, a traceback at start
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=r"c.toml': tables or arrays nested more than 32 levels deep .* fix its"):
        Config.load(str(path), env={})


def test_bad_environment_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="STREAMGPU_PORT='x': port must be an integer"):
        Config.load(None, env={"STREAMGPU_PORT": "x"})
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.load("/nonexistent.toml", env={})


def test_a_mistyped_environment_variable_is_refused_naming_the_closest_known_one() -> None:
    # STREAMGPU_PROT=9000 was ignored: the server listened on 7878
    with pytest.raises(
        ConfigError, match=r"unknown environment variable STREAMGPU_PROT \(did you mean 'STREAMGPU_PORT'\?\)"
    ):
        Config.load(None, env={"STREAMGPU_PROT": "9000", "STREAMGPU_PORT": "9001"})
    with pytest.raises(ConfigError, match=r"unknown environment variables STREAMGPU_LISTENERS, STREAMGPU_XYZZY\b"):
        Config.load(None, env={"STREAMGPU_XYZZY": "", "STREAMGPU_LISTENERS": "x"})
    # the variable streamgpu reads elsewhere: send's token under its old (deprecated) name
    assert Config.load(None, env={"STREAMGPU_TOKEN": "t"}).listeners[0].port == 7878


def test_an_environment_variable_in_the_wrong_case_is_refused_naming_the_right_one() -> None:
    # streamgpu_port=9000 was ignored (the server listened on 7878); STREAMGPU_port had no hint
    for var in ("streamgpu_port", "STREAMGPU_port", "Streamgpu_Port"):
        with pytest.raises(ConfigError, match=rf"variable {var} \(did you mean 'STREAMGPU_PORT'\?\)"):
            Config.load(None, env={var: "9000"})
    # a typo of the token's deprecated name (still read by send) is pointed at its new name, not at the old one
    for var in ("STREAMGPU_TOKN", "streamgpu_token"):
        with pytest.raises(ConfigError, match=rf"variable {var} \(did you mean 'STREAMGPU_AUTH_TOKEN'\?\)"):
            Config.load(None, env={var: "t"})
    # a lower-case variable that names no setting is someone else's
    assert Config.load(None, env={"streamgpu_home": "/opt"}).listeners[0].port == 7878


def test_several_wrong_types_are_named_at_once_and_ints_serve_as_floats(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = "7883"\ncuda_kernels = 1\nhello_timeout_s = 5\n')
    with pytest.raises(ConfigError, match=r"port must be an integer.*cuda_kernels must be true or false"):
        Config.load(str(path), env={})
    path.write_text("[server]\nhello_timeout_s = 5\n[[models]]\nmean = [0, 0, 0]\n")
    cfg = Config.load(str(path), env={})
    assert cfg.hello_timeout_s == 5.0 and isinstance(cfg.hello_timeout_s, float)
    assert cfg.models[0].mean == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("FALSE", False), ("1", True), ("off", False)])
def test_environment_booleans_are_strict(raw: str, value: bool) -> None:
    assert Config.load(None, env={"STREAMGPU_CUDA_KERNELS": raw}).cuda_kernels is value
    with pytest.raises(ConfigError, match="STREAMGPU_CUDA_KERNELS='maybe': cuda_kernels must be true or false"):
        Config.load(None, env={"STREAMGPU_CUDA_KERNELS": "maybe"})


def test_first_model_fields_make_a_non_image_model_without_toml() -> None:
    cfg = Config.load(None, env={}, model="torchscript:m.pt",
                      first_model={"name": "lidar", "input_shape": (1024, 4), "input_dtype": "float32"})  # fmt: skip
    spec = cfg.models[0]
    assert (spec.name, spec.source, spec.input_shape, spec.input_dtype, spec.preprocess) == (
        "lidar", "torchscript:m.pt", (1024, 4), "float32", "none")  # fmt: skip
    gray = Config.load(None, env={}, first_model={"input_shape": (480, 640, 1)}).models[0]
    assert gray.preprocess == "image" and gray.mean == (0.5,)
    with pytest.raises(ConfigError, match=re.escape("models[0].input_shape must be a list of integers")):
        Config.load(None, env={}, first_model={"input_shape": ("a",)})


def test_resolved_settings_mask_token_values() -> None:
    cfg = Config(auth_token="s3cret", tokens={"cam": TokenSpec("other-secret", 3)})
    text = str(cfg.resolved())
    assert "s3cret" not in text and "other-secret" not in text
    assert cfg.resolved()["tokens"]["cam"] == {"token": "***", "max_priority": 3, "max_connections": 0}


def test_a_negative_shutdown_timeout_says_zero_is_allowed() -> None:
    with pytest.raises(ConfigError, match=re.escape("shutdown_timeout_s must be a finite number of seconds >= 0")):
        Config(shutdown_timeout_s=-1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 7990, "http_port": 7990}, "listeners[1] (http) and listeners[0] (tcp) both use port 7990"),
        ({"port": 7990, "results_port": 7990}, "results_port and listeners[0] (tcp) both use port 7990"),
        ({"host": "0.0.0.0", "port": 7990, "results_port": 7990}, "results_port and listeners[0] (tcp)"),
    ],
)
def test_one_tcp_port_given_twice_is_a_config_error(overrides: dict[str, Any], message: str) -> None:
    # the second bind would fail only after the models loaded, with asyncio's message naming neither
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.load(env={}, **overrides)


def test_one_port_number_on_two_addresses_or_udp_and_tcp_is_fine() -> None:
    Config.load(env={}, port=7990, udp_port=7990)  # a UDP socket and a TCP one
    Config(listeners=[ListenerSpec(host="127.0.0.1", port=7990), ListenerSpec(host="127.0.0.2", port=7990)])
    Config.load(env={}, port=0, http_port=0, results_port=0)  # free ports, each its own


@pytest.mark.parametrize("name", ["STREAMGPU_PORT", "STREAMGPU_RING_BYTES", "STREAMGPU_DEVICES"])
def test_an_environment_number_of_thousands_of_digits_is_refused_with_the_value_cut(name: str) -> None:
    # int() refuses past 4300 digits: the message said the setting "must be an integer" (it is one) and quoted
    # all 5000 digits
    with pytest.raises(ConfigError) as info:
        Config.load(None, env={name: "9" * 5000})
    message = str(info.value)
    assert f"environment {name}='99999999999999999999'... (5000 characters): " in message and len(message) < 300
    assert "of at most 20 digits" in message
