"""Shared by the serve tests: the server's stack or a skip (never in CI), and a server on a real
port (uvicorn in a thread) for the clients that need one (openai, the browser, the load test)."""

import socket
import threading
import time
from contextlib import contextmanager

from conftest import require_modules


def require_serve():
    require_modules("starlette", "uvicorn", "httpx", "python_multipart")


@contextmanager
def live_server(config):
    """uvicorn serving create_app(config) on a free port of 127.0.0.1 -> its base URL."""
    import uvicorn

    from tiny_imagegen.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
