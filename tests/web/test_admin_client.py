"""The admin client (``streamgpu admin``) against servers that are not what it expects."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from streamgpu.web import admin_client
from streamgpu.web.admin_client import AdminError, request


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``answer`` (status, headers) and keeps each request's Authorization header."""

    answer: tuple[int, dict[str, str]] = (200, {})
    seen: list[str | None]

    def _reply(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        status, headers = self.answer
        self.send_response(status)
        for name, value in {**headers, "Content-Length": "0"}.items():
            self.send_header(name, value)
        self.end_headers()

    do_GET = do_POST = _reply

    def log_message(self, *args: object) -> None:
        pass


def _serve(answer: tuple[int, dict[str, str]]) -> tuple[http.server.HTTPServer, list[str | None]]:
    seen: list[str | None] = []
    handler = type("Handler", (_Answer,), {"answer": answer, "seen": seen})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture
def elsewhere() -> Iterator[tuple[str, list[str | None]]]:
    """Another host's server: what reaches it."""
    server, seen = _serve((200, {"Content-Type": "application/json"}))
    yield f"http://127.0.0.1:{server.server_address[1]}/steal", seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else(
    elsewhere: tuple[str, list[str | None]], code: int
) -> None:
    # urllib followed it, sending the token in the Authorization header to wherever the answer pointed
    target, seen_there = elsewhere
    server, seen_here = _serve((code, {"Location": target}))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(AdminError, match=rf"HTTP {code}: redirected to '{target}', not followed"):
            request(url, "/v2/repository/index", token="s3cret")
    finally:
        server.shutdown()
        server.server_close()
    assert seen_here == ["Bearer s3cret"] and seen_there == []


def test_a_listing_from_a_port_that_never_answers_ends_in_seconds_not_in_a_loads_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The listing waited request()'s 600 s, meant for loads
    monkeypatch.setattr(admin_client, "INDEX_TIMEOUT_S", 0.3, raising=False)
    errors: list[BaseException] = []

    def listing(url: str) -> None:
        try:
            admin_client.index(url)
        except AdminError as exc:
            errors.append(exc)

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the backlog), never answers
        thread = threading.Thread(target=listing, args=(f"http://127.0.0.1:{silent.getsockname()[1]}",), daemon=True)
        thread.start()
        thread.join(5.0)
        assert not thread.is_alive(), "still waiting after 5 s"
    assert len(errors) == 1 and "timed out" in str(errors[0]), errors
