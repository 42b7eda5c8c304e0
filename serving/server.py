"""Run the app under uvicorn: `bertforge serve` and the tests' loopback servers both start here."""
from __future__ import annotations

import errno
import logging
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import BertforgeError
from serving.config import ServeConfig


def bind(host: str, port: int) -> socket.socket:
    """Bind before loading anything, so a busy port is a clear error; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then, and without it
    # every keep-alive response waits ~40 ms for a delayed ACK (headers and body are separate writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise BertforgeError(f"{host}:{port} {why}") from None
    sock.set_inheritable(True)
    return sock


def build_server(model_dir: str | Path, config: ServeConfig, runtime=None):
    """A uvicorn.Server for the model (loaded now: a missing or corrupt folder raises BertforgeError)."""
    import uvicorn

    from serving.app import create_app

    app = create_app(model_dir, config, runtime)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level, access_log=False,
        # uvicorn stops accepting, waits up to this long for requests in flight, then runs the
        # app's shutdown, which answers what is still queued.
        timeout_graceful_shutdown=max(1, int(config.graceful_timeout_s)),
        # Past limit_concurrency open connections (idle keep-alive ones count) uvicorn answers 503 itself;
        # an idle keep-alive connection is closed after timeout_keep_alive. A slow body is cut off by the
        # app's request deadline (uvicorn has no body timeout).
        limit_concurrency=config.limit_concurrency,
        timeout_keep_alive=config.timeout_keep_alive_s,
        lifespan="on",
    )
    return uvicorn.Server(uv_config)


def serve(model_dir: str | Path, config: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; requests in flight are answered before the process exits."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind(config.host, config.port)
    try:
        server = build_server(model_dir, config)
        logging.getLogger("bertforge.serve").info(
            "serving %s on http://%s:%d (docs at /docs, metrics at /metrics)", model_dir, config.host,
            sock.getsockname()[1])
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def serve_in_thread(model_dir: str | Path, config: ServeConfig, ready_timeout: float = 60.0, wait_ready: bool = True,
                    runtime=None):
    """A real server on a background thread (tests, notebooks); yields its URL once /readyz answers
    (/healthz without `wait_ready`).
    Leaving the block shuts it down as SIGTERM would: requests in flight are answered first."""
    import threading
    import urllib.error
    import urllib.request

    sock = bind(config.host, config.port)
    try:
        server = build_server(model_dir, config, runtime)
    except BaseException:
        sock.close()  # a model that fails to load must not leave the port bound
        raise
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="bertforge-serve", daemon=True)
    thread.start()
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/{'readyz' if wait_ready else 'healthz'}", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or not thread.is_alive():
                    raise BertforgeError(f"server on {url} not ready after {ready_timeout:.0f}s") from None
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=config.graceful_timeout_s + 10)
        sock.close()
