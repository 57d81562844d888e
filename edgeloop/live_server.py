"""An ASGI app served by uvicorn in a thread, for the demo and tests.

The socket is bound to a free port before uvicorn starts, so the URL is known up front and no
other process can take the port in between. uvicorn installs signal handlers only in the main
thread, which this is not; the owner stops it with :meth:`LiveServer.stop` (or ``with``).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class LiveServer:
    """``app`` under uvicorn in a daemon thread on 127.0.0.1 and a free port.

    Args:
        app: the ASGI application (its lifespan runs).
        error: the exception type raised when the server does not start or stop in time.
    """

    def __init__(self, app: Any, *, error: type[Exception] = RuntimeError) -> None:
        import uvicorn

        self._error = error
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                self.stop()
                raise self._error(f"uvicorn at {self.url} exited while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise self._error(f"uvicorn at {self.url} not started in {START_TIMEOUT_S} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for its thread.

        Raises:
            the ``error`` type: the thread did not end within ``STOP_TIMEOUT_S``.
        """
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_TIMEOUT_S)
        self._sock.close()
        if self._thread.is_alive():
            raise self._error(f"uvicorn at {self.url} did not stop in {STOP_TIMEOUT_S} s")
