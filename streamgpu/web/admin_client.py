"""A client of the model administration routes (streamgpu.web.admin), for ``streamgpu admin``: blocking, stdlib only."""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from streamgpu.errors import StreamgpuError
from streamgpu.files import TOO_DEEP


class AdminError(StreamgpuError, RuntimeError):
    """The server refused an admin request, or could not be reached; the message says which and why."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered, not followed: urllib would send the request on, as a GET without its body but
    with its ``Authorization`` header, to wherever the answer points, another host included."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # (urllib then raises the 3xx as an HTTPError)


_OPENER = urllib.request.build_opener(_NoRedirects)


def request(url: str, path: str, body: dict[str, Any] | None = None, token: str = "", timeout: float = 600.0) -> Any:
    """POST ``body`` (JSON) to ``url`` + ``path``; returns the decoded JSON reply or raises ``AdminError``."""
    if (why := url_problem(url)) is not None:
        raise AdminError(why)
    data = json.dumps(body or {}).encode()
    headers: dict[str, Any] = {"Content-Type": "application/json"}
    if token:
        # As UTF-8, as the server reads it (http.client would send a str as Latin-1, which matches no token
        # beyond ASCII, and fails on any other character)
        if not is_text(token):
            raise AdminError("the token is not valid UTF-8 text")  # (not shown: a secret)
        headers["Authorization"] = b"Bearer " + token.encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method="POST")
    try:
        with _OPENER.open(req, timeout=timeout) as reply:
            return json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            where = exc.headers.get("Location", "") if exc.headers else ""
            raise AdminError(f"{url}{path}: HTTP {exc.code}: redirected to {where!r}, not followed (the request "
                             "carries its token): give the server's own URL") from None  # fmt: skip
        try:
            message = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            message = ""
        raise AdminError(f"{url}{path}: HTTP {exc.code}: {message or exc.reason}") from None
    except http.client.HTTPException as exc:  # e.g. the wire protocol's TCP port, which answers in its own words
        raise AdminError(f"{url}{path}: no HTTP reply ({type(exc).__name__}): is it the server's http_port?") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AdminError(f"{url}{path}: {getattr(exc, 'reason', exc)}") from None


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot address a server's HTTP front end, or None: asked before any request, as urllib
    would raise ValueError (a traceback), read a file: URL, or blame the server (no host, a bad port)."""
    if not url.startswith(("http://", "https://")):
        return f"URL must start with http:// or https://, got {url!r}"
    if re.search(r"[\x00-\x20\x7f]", url):  # (http.client refuses them, as an InvalidURL)
        return f"URL {url!r}: a space or control character in it"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        return f"URL {url!r}: not a URL ({exc})"
    if not parts.hostname:
        return f"URL {url!r}: no host (e.g. http://127.0.0.1:8000)"
    try:
        parts.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError:
        return f"URL {url!r}: port {parts.netloc.rpartition(':')[2]!r} is not 0..65535"
    return None


# A listing is answered at once; a load may take minutes (``request``'s default). A port that accepts and never
# answers kept ``streamgpu admin list`` waiting the load's 600 s.
INDEX_TIMEOUT_S = 30.0


def index(url: str, token: str = "") -> list[dict[str, Any]]:
    """Every model the server knows: name, version, state, reason."""
    entries: list[dict[str, Any]] = request(url, "/v2/repository/index", token=token, timeout=INDEX_TIMEOUT_S)
    return entries


def load(url: str, name: str, settings: dict[str, Any] | None = None, token: str = "") -> None:
    """Load ``name`` (a new version if served) with ``settings``, or from the server's repository / last settings."""
    body = {"parameters": {"config": json.dumps(settings)}} if settings else {}
    request(url, f"/v2/repository/models/{_quoted(name)}/load", body, token)


def unload(url: str, name: str, token: str = "") -> None:
    """Stop serving ``name`` (its queued frames finish first)."""
    request(url, f"/v2/repository/models/{_quoted(name)}/unload", token=token)


def _quoted(name: str) -> str:
    """``name`` as one segment of a URL path; ``AdminError`` for one that is not text: no model has such a name."""
    if not is_text(name):
        raise AdminError(f"model name {name!r} is not valid UTF-8 text")
    return urllib.parse.quote(name, safe="")


def is_text(value: str) -> bool:
    """Whether ``value`` encodes to UTF-8: bytes of a command line or the environment that are not UTF-8 come as
    surrogates, which do not."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to settings: VALUE is JSON when it parses (numbers, lists, true), else a string
    (ValueError for a pair that is not KEY=VALUE)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {pair!r} must be KEY=VALUE (e.g. max_batch_size=16, input_shape=[224,224,3])")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
        except RecursionError:  # (json's parser recurses for each array or object: a traceback)
            raise ValueError(f"setting {key!r}: {TOO_DEEP}") from None
    return out
