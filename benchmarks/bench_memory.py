"""Server memory for worst-case uploads, measured in one run (not a test).

    python benchmarks/bench_memory.py [--model PATH] [--after-wait 5]

Starts `app.py` as a subprocess, samples its resident memory (VmRSS, children included) every 20 ms, and sends
worst-case files through the /explain endpoint with gradio_client: one of each kind within the limits, headers
declaring more than the limits (which must be refused), then four of the costliest at once, each from its own
client. The files are mostly zeros: a few hundred KB that decode to hundreds of MB, as in the reported attack.

The baseline is the server's RSS after one small warm-up request (lazy imports and the first model run are not
an upload's cost). The single uploads go through the warm-up's client (one session); the four concurrent ones
open four sessions. The app keeps each session's analysis, so RSS is read twice after each case: 'after', while
the sessions still hold the big uploads' analyses, and 'released', once each of the case's clients has analysed a
small image instead. Goals: peak < 2048 MB for one upload, < 3072 MB for four at once, and 'released' within
300 MB of the baseline (what the uploads themselves left behind).

    python benchmarks/bench_memory.py --cases data-url

The data-URL case only: a 16-bit grey 12000x12000 PNG of 280 KB sent inline as a data: URL through the plain
HTTP API (POST /gradio_api/call/explain; the app refuses it before anything decodes it), once and four at once,
next to the same kind of file sent as an upload, once and four at once (four files a pixel of width apart).
Goals as above.
"""

import argparse
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_images import write_png  # noqa: E402  (the same crafted PNGs the tests use)

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", REPO.parent / "shared"))
SINGLE_MB, CONCURRENT_MB, AFTER_MB = 2048, 3072, 300


def rss_mb(pid: int) -> float:
    """VmRSS of a process and all its descendants, in MB (0 once it is gone)."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/status") as status:
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                total += sum(rss_mb(int(child)) for child in children.read().split())
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        pass
    return total


class Sampler(threading.Thread):
    """Tracks the peak RSS of a process tree since the last reset."""

    def __init__(self, pid: int, every: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stopped = pid, every, 0.0, False

    def run(self):
        while not self.stopped:
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(self.every)

    def reset(self) -> None:
        self.peak = rss_mb(self.pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_served(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"app.py exited with {server.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"app.py did not serve {url} within {timeout:.0f} s")


def header_only_png(path: Path, width: int, height: int) -> Path:
    """An RGB PNG whose header declares width x height but whose pixel data is a stub: refused before decoding."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1 + 3 * width))  # one row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def make_cases(folder: Path):
    """(name, path, must be refused) for one upload each; and the file kind sent four times at once."""
    jpeg = folder / "big.jpg"
    Image.linear_gradient("L").resize((12000, 9000)).convert("RGB").save(jpeg, quality=85)
    webp = folder / "big.webp"
    Image.new("RGB", (4700, 4700), (200, 60, 30)).save(webp, lossless=True)
    single = [
        ("16-bit grey PNG 12000x12000", write_png(folder / "grey16.png", 12000, 12000, 16, 0), False),
        ("8-bit RGB PNG 10000x10000", write_png(folder / "rgb.png", 10000, 10000, 8, 2), False),
        ("JPEG 12000x9000", jpeg, False),
        ("lossless WebP 4700x4700", webp, False),
        ("bomb: 16-bit RGBA PNG 12000x12000", write_png(folder / "rgba16.png", 12000, 12000, 16, 6), True),
        ("bomb: PNG header 100000x100000", header_only_png(folder / "declared.png", 100000, 100000), True),
    ]
    # Four different files (a byte of width apart), so nothing can be shared between the uploads.
    concurrent = [write_png(folder / f"rgb-{i}.png", 10000 - i, 10000, 8, 2) for i in range(4)]
    return single, concurrent


def client_for(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, analytics_enabled=False)


def explain(client, path: Path) -> str:
    from gradio_client import handle_file

    try:
        client.predict(handle_file(str(path)), api_name="/explain")
        return "ok"
    except Exception as exc:  # the app's gr.Error arrives as an AppError carrying the message
        return f"refused: {str(exc).splitlines()[0][:90]}"


def explain_inline(url: str, path: Path, options: list) -> str:
    """/explain over the plain HTTP API with the image inline, as a data: URL (no upload, no session)."""
    import httpx

    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    image = {"path": None, "url": data_url, "meta": {"_type": "gradio.FileData"}}
    event = httpx.post(f"{url}gradio_api/call/explain", json={"data": [image, *options]}, timeout=300).json()
    answer = httpx.get(f"{url}gradio_api/call/explain/{event['event_id']}", timeout=300).text
    if "event: complete" in answer:
        return "ok"
    return f"refused: {json.loads(answer.split('data:', 1)[1])['error'][:90]}"


def api_options(client) -> list:
    """/explain's values after the image, as view_api lists their defaults (the plain API fills in none)."""
    parameters = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/explain"]["parameters"]
    return [p["parameter_default"] for p in parameters[1:]]


def run_case(clients, sampler, pid, paths, after_wait, small, send_one=None):
    """Peak while the uploads run; RSS after them; RSS once every client has moved on to a small image.
    send_one(i): how request i is sent (default: paths[i] uploaded through clients[i])."""
    kb = paths[0].stat().st_size / 1024
    sampler.reset()
    started = time.perf_counter()
    outcomes = [None] * len(paths)
    send_one = send_one or (lambda i: explain(clients[i], paths[i]))

    def send(i):
        outcomes[i] = send_one(i)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    peak = sampler.peak
    time.sleep(after_wait)
    after = rss_mb(pid)
    for client in {id(c): c for c in clients}.values():
        explain(client, small)
    time.sleep(after_wait)
    return kb, outcomes, peak, after, rss_mb(pid), seconds


def dense_grey16_png(path: Path, width: int, height: int) -> Path:
    """A 16-bit grey PNG of zeros at zlib's best compression: ~280 KB for 12000x12000, as in the report (the tests'
    write_png compresses fast, to ~1.2 MB)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), bytes(1 + 2 * width)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def data_url_rows(url, client, sampler, pid, folder: Path, after_wait: float, small: Path) -> list:
    """The 16-bit grey 12000x12000 PNG inline as a data: URL (must be refused), once and four at once, and the
    same kind of file as an upload (must load), once and four at once."""
    options = api_options(client)
    grey = [dense_grey16_png(folder / f"grey16-{i}.png", 12000 - i, 12000) for i in range(4)]
    rows = []
    for count in (1, 4):
        print(f"data URL x{count}...", file=sys.stderr)
        measured = run_case(
            [client] * count,
            sampler,
            pid,
            grey[:count],
            after_wait,
            small,
            send_one=lambda i: explain_inline(url, grey[i], options),
        )
        rows.append(
            (
                f"data URL x{count}: 16-bit grey PNG 12000x12000",
                *measured,
                SINGLE_MB if count == 1 else CONCURRENT_MB,
                True,
            )
        )
    for count in (1, 4):
        print(f"upload x{count}...", file=sys.stderr)
        clients = [client] if count == 1 else [client_for(url) for _ in range(count)]
        measured = run_case(clients, sampler, pid, grey[:count], after_wait, small)
        rows.append(
            (
                f"upload x{count}: 16-bit grey PNG 12000x12000",
                *measured,
                SINGLE_MB if count == 1 else CONCURRENT_MB,
                False,
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    parser.add_argument("--after-wait", type=float, default=5.0, help="seconds before 'after' is read")
    parser.add_argument(
        "--cases",
        choices=["all", "data-url"],
        default="all",
        help="all: every upload case; data-url: the inline data: URL against the upload",
    )
    args = parser.parse_args(argv)

    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
    os.environ.update(NO_PROXY=env["NO_PROXY"], GRADIO_ANALYTICS_ENABLED="False")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        print("writing the test files...", file=sys.stderr)
        single, concurrent = make_cases(folder)
        warm = folder / "warm.png"
        Image.new("RGB", (320, 240), (90, 140, 200)).save(warm)

        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        server = subprocess.Popen(
            [sys.executable, "app.py", "--model", args.model, "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_served(url, server)
            sampler = Sampler(server.pid)
            sampler.start()
            started_mb = rss_mb(server.pid)
            # One client (one session) for the warm-up and every single upload: the app keeps each session's
            # analysis (~50-90 MB here), so new sessions would read as memory that the upload left behind.
            client = client_for(url)
            assert explain(client, warm) == "ok", "the warm-up request failed"
            time.sleep(args.after_wait)
            baseline = rss_mb(server.pid)
            print(
                f"server RSS: {started_mb:.0f} MB once serving, {baseline:.0f} MB after a warm-up request "
                f"(the baseline)"
            )
            print(
                f"rule: peak < {SINGLE_MB} MB (one upload), < {CONCURRENT_MB} MB (4 at once); 'released' within "
                f"{AFTER_MB} MB of the baseline; bombs refused, others load.\n'after': {args.after_wait:g} s after "
                "the case, sessions still holding their analyses; 'released': once each of the case's clients has "
                "analysed a small image instead (what the uploads left behind)\n"
            )
            rows = []
            if args.cases == "data-url":
                rows = data_url_rows(url, client, sampler, server.pid, folder, args.after_wait, warm)
                single, concurrent = [], []
            for name, path, must_refuse in single:
                print(f"{name}...", file=sys.stderr)
                measured = run_case([client], sampler, server.pid, [path], args.after_wait, warm)
                rows.append((name, *measured, SINGLE_MB, must_refuse))
            if concurrent:
                print("4 at once...", file=sys.stderr)
                clients = [client_for(url) for _ in concurrent]  # four sessions: three more analyses kept after
                measured = run_case(clients, sampler, server.pid, concurrent, args.after_wait, warm)
                rows.append(("4 at once: 8-bit RGB PNG ~10000x10000", *measured, CONCURRENT_MB, False))
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(
        f"{'case':40s} {'file KB':>8s} {'peak MB':>8s} {'after MB':>9s} {'released':>9s} {'base MB':>8s} "
        f"{'s':>6s}  result"
    )
    failed = 0
    for name, kb, outcomes, peak, after, released, seconds, limit, must_refuse in rows:
        refused = [o.startswith("refused") for o in outcomes]
        ok = peak < limit and released - baseline < AFTER_MB and all(r == must_refuse for r in refused)
        failed += not ok
        print(
            f"{name:40s} {kb:8.0f} {peak:8.0f} {after:9.0f} {released:9.0f} "
            f"{baseline:8.0f} {seconds:6.1f}  {'PASS' if ok else 'FAIL'}  {'; '.join(sorted(set(outcomes)))}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
