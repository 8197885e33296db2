"""Start the web app in-process on a free local port (shared by the gradio_client and browser tests)."""

import socket
from contextlib import contextmanager

import app


def free_port() -> int:
    # Gradio refuses server_port=0; ask the OS for a free port and hand it over (a tiny race, fine locally).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(bundle):
    """Yield (demo, url) for the app on the real model, with the same launch options as `python app.py`."""
    demo = app.build_demo(bundle)
    port = free_port()
    demo.launch(prevent_thread_lock=True, **app.launch_options("127.0.0.1", port))
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
