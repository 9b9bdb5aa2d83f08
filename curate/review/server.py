"""Run the review app: a socket on 127.0.0.1 (a free port unless one is asked for), uvicorn on it."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import CurateError


def _need_web() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CurateError(
            "curate review needs starlette and uvicorn: pip install 'curate[review]'", exit_code=1
        ) from None


def bind(port: int | None) -> socket.socket:
    """A listening socket on 127.0.0.1 only (never all interfaces); port 0 or None picks a free one."""
    if port is not None and not 0 <= port <= 65535:
        raise CurateError(
            f"--port {port} is not a TCP port (0-65535); pick another or leave it out for a free one"
        )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port or 0))
    except OSError as exc:
        sock.close()
        raise CurateError(
            f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick another --port or leave it out "
            "for a free one"
        ) from None
    sock.listen(64)
    return sock


def _server(app, sock: socket.socket):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    return uvicorn.Server(config)


def serve(
    root: str | Path,
    *,
    manifest: str | None = None,
    config: str | None = None,
    port: int | None = None,
    open_browser: bool = True,
    say: Callable[[str], None] = print,
    say_stopped: Callable[[], None] = lambda: None,
) -> None:
    """Serve the review page until Ctrl-C (blocking)."""
    _need_web()
    from .app import make_app, url
    from .state import Review

    rv = Review(root, manifest, config)
    sock = bind(port)
    try:
        token = secrets.token_urlsafe(18)
        real = sock.getsockname()[1]
        address = url(real, token)
        say(address)
        if open_browser:
            import webbrowser

            webbrowser.open(address)
        try:
            _server(make_app(rv, token, real), sock).run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C is how the page is closed: every change is already written
            say_stopped()
    finally:
        sock.close()
        rv.close()


@contextlib.contextmanager
def running(root: str | Path, *, manifest: str | None = None, port: int | None = None) -> Iterator[str]:
    """Serve in a background thread (tests, screenshots); yields the address with the token."""
    _need_web()
    from .app import make_app, url
    from .state import Review

    sock = bind(port)
    token = secrets.token_urlsafe(18)
    real = sock.getsockname()[1]
    box: dict = {}
    ready = threading.Event()

    def run() -> None:
        try:  # the Review's SQLite connections belong to this thread, where the handlers run
            rv = Review(root, manifest)
        except BaseException as exc:
            box["error"] = exc
            ready.set()
            return
        box["server"] = srv = _server(make_app(rv, token, real), sock)
        ready.set()
        try:
            srv.run(sockets=[sock])
        finally:
            rv.close()

    t = threading.Thread(target=run, name="curate-review", daemon=True)
    t.start()
    ready.wait()
    if "error" in box:
        sock.close()
        raise box["error"]
    try:
        while not box["server"].started:
            t.join(0.01)
            if not t.is_alive():
                raise RuntimeError("the review server stopped while starting")
        yield url(real, token)
    finally:
        box["server"].should_exit = True
        t.join(10)
        sock.close()
