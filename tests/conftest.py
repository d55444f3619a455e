"""Shared test fixtures.

* Every async test (``@pytest.mark.asyncio``) runs twice: once on the plain
  asyncio loop and once on uvloop (test ids end in ``[asyncio]`` /
  ``[uvloop]``), through pytest-asyncio's ``pytest_asyncio_loop_factories``
  hook. A test can pick loops with ``@pytest.mark.asyncio(loop_factories=["uvloop"])``.
* Every async test fails if anything reached the loop's exception handler
  (an exception in a callback or protocol method, a task or future whose
  exception was never retrieved, ...). A test that provokes such a report on
  purpose takes the ``loop_errors`` fixture and clears the list it yields.
* The heap is frozen (``gc.freeze``) between tests, so that the full collection
  each async test ends with walks only the objects made since the last test
  (``_heap_frozen_between_tests``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import pytest
import pytest_asyncio

from streamgpu.loops import freeze_heap, thaw_heap

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
    uvloop = None  # type: ignore[assignment]


def _loop_factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    """Run each async test on plain asyncio and on uvloop."""
    return _loop_factories()


@pytest_asyncio.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Contexts passed to the running loop's exception handler during the test.

    The test fails at teardown if the list is not empty then.
    """
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context)
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield errors
        # Let pending callbacks run and collect dead futures/tasks so that
        # "exception was never retrieved" reports land here, not in a later test.
        await asyncio.sleep(0)
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    if errors:
        pytest.fail(
            "the event loop's exception handler was called: "
            + "; ".join(str(c.get("message")) + (f" ({c['exception']!r})" if "exception" in c else "") for c in errors),
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _fail_on_loop_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Install ``loop_errors`` for every async test (sync tests have no loop to watch)."""
    if pytest_asyncio.is_async_test(request.node):
        request.getfixturevalue("loop_errors")
    yield


@pytest.fixture(scope="session", autouse=True)
def _heap_frozen_between_tests() -> Iterator[None]:
    """Held for the whole session, as a running server holds it (``loops.freeze_heap``: the heap frozen, young
    collections past ``YOUNG_THRESHOLD``, every collection timed): a server a test stops no longer thaws the
    heap, and ``pytest_runtest_teardown`` below freezes what each test leaves.

    With torch (and, once a test loaded an exported program, sympy and torch._dynamo) imported, a full collection
    walks about 400,000 objects: 0.3 s on the 2-core CI machine, after every async test (``loop_errors``), 200 s
    of the suite. Frozen, it walks what the test made, which is what can hold a report for the test's own loop
    (each test has a loop of its own, and a loop's exception handler is the test's only while it runs), except
    garbage in a cycle through an object an earlier test of the module left (a module global, say): that is
    collected at the module's end, unreported. Tests of the server's own freeze take ``heap_owned_by_the_server``."""
    freeze_heap()
    yield
    thaw_heap()


@pytest.fixture
def heap_owned_by_the_server() -> Iterator[None]:
    """For a test of what a server does to the heap (``loops.freeze_heap`` at its start: the heap frozen before
    models load, collections timed): the session's hold is let go meanwhile, or the server's freeze would be a
    nested call that does nothing, and the test would pass with a server that never froze (review). Take it
    before the fixture that starts the server."""
    thaw_heap()
    yield
    freeze_heap()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After each test's teardown: collect what it left (the young objects only, so quick) and freeze the rest.
    After a module's last test (its module-scoped fixtures gone), the whole heap is thawed and collected once,
    so that garbage frozen while still in use (a module-scoped server's cycles, say) does not pile up."""
    try:
        return (yield)
    finally:
        if nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None):
            gc.unfreeze()
        gc.collect()
        gc.freeze()


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """``streamgpu serve`` run in this process (tests/test_cli.py) sets the root logger to INFO with a
    stderr handler; undone after each test, so later tests (the timed isolation test above all) do not
    format and write a line per connection that their own runs would not."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
