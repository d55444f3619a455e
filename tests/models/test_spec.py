"""Model settings: what a spec refuses, and the sizes it derives."""

from __future__ import annotations

import math
import re

import pytest

from streamgpu.config import Config
from streamgpu.models.spec import BUILTIN_NAMES, ModelSpec


def test_frame_bytes_past_64_bits_are_counted_exactly_and_exceed_max_payload_bytes() -> None:
    """np.prod of an int64 shape wraps: (65536,) * 4 gave 0 bytes, which passed the server's max_payload_bytes
    check, and the load then failed at warm-up with 'cannot reshape array of size 0'."""
    for shape, nbytes in (((65536,) * 4, 2**64), ((2**62 + 1, 4), 2**64 + 4)):
        spec = ModelSpec(name="m", source="builtin:small", input_shape=shape, preprocess="none")
        assert spec.frame_nbytes == nbytes
        assert any("exceed max_payload_bytes" in p for p in Config().model_problems(spec)), shape


@pytest.mark.parametrize("key", ["mean", "std"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_mean_or_std_that_is_not_finite_is_refused_naming_it(key: str, bad: float) -> None:
    """TOML reads nan and inf: a NaN mean or std made every output NaN, an infinite std every input 0."""
    with pytest.raises(ValueError, match=f"mean and std must be finite numbers.*{key} \\[{bad}"):
        ModelSpec(name="m", **{key: (bad, 0.5, 0.5)})  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [">f4", ">u2"])
def test_a_big_endian_input_dtype_is_refused_naming_it(dtype: str) -> None:
    """The wire's tensors are little-endian: '>f4' was taken for float32 frames, read as big-endian ones, and the
    load failed at warm-up on torch's byte-order error, blaming input_shape."""
    with pytest.raises(ValueError, match=f"input_dtype '{dtype}' is big-endian"):
        ModelSpec(name="m", input_dtype=dtype, preprocess="none", input_shape=(4,))


@pytest.mark.parametrize("postprocess", ["topk:\u00b2", "topk:" + "9" * 5000])
def test_a_top_k_int_cannot_read_is_refused_naming_postprocess(postprocess: str) -> None:
    """str.isdigit takes a superscript digit, which int() refuses, and int() refuses more than 4300 digits: the
    spec's ValueError was int()'s ('invalid literal', 'sys.set_int_max_str_digits'), naming no setting."""
    with pytest.raises(ValueError, match=r"postprocess .* must be '' \(none\) or 'topk:K' with K >= 1"):
        ModelSpec(name="m", postprocess=postprocess)


@pytest.mark.parametrize(
    ("source", "arch", "message"),
    [
        ("builtin:resnet5", "", "source 'builtin:resnet5': unknown builtin model 'resnet5'; builtins are"),
        ("state_dict:w.pt", "resnt18", "arch 'resnt18': unknown builtin architecture"),
    ],
)
def test_an_unknown_builtin_name_is_refused_with_the_settings(source: str, arch: str, message: str) -> None:
    # Found only when the model loaded: check-config passed both, and serve named them after its backend started
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelSpec(source=source, arch=arch)


def test_the_builtin_names_a_config_may_give_are_the_builtins() -> None:
    from streamgpu.models.builtin import BUILTINS

    assert sorted(BUILTINS) == sorted(BUILTIN_NAMES)
    for name in BUILTIN_NAMES:
        ModelSpec(source=f"builtin:{name}")
        ModelSpec(source="state_dict:w.pt", arch=name)
