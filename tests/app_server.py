"""Start the web app in-process on a free local port (shared by the gradio_client and browser tests)."""

import socket
from contextlib import contextmanager

import pytest
from gradio_client import Client

from zoomvit.app import ui as app


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


# Module fixtures for the API tests (test_app, test_api_faults): one app per test module, on the real model.
@pytest.fixture(scope="module")
def server(deit_tiny):
    with running_app(deit_tiny) as (demo, url):
        yield demo, url


@pytest.fixture(scope="module")
def url(server):
    return server[1]


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def photos(shared_dir):
    folder = shared_dir / "data" / "imagenet-sample"
    return {"tench": str(folder / "n01440764_tench.JPEG"), "shark": str(folder / "n01484850_great_white_shark.JPEG")}
