"""serve.py under load: a server started as a user starts it, then the same upload sent by 1, then by C clients
at once; the answers' status codes, seconds per request (median and slowest) and requests per second.

    python benchmarks/bench_serve.py --checkpoint output/model.pt --image volume.nii.gz [--requests 8]
                                     [--clients 1 4] [--device cuda] [--json F]

Each request is ``POST /api/segment`` with the file in the multipart field ``file`` (the mask comes back in the
file's format). A 503 is the server's queue refusing a request it could not start within ``--queue-timeout``:
counted, not an error. Not a test: nothing here asserts; tests/test_benchmarks.py smoke-runs it.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float) -> None:
    """Until ``GET /api/health`` answers (the model is loaded), or the server has exited, or ``seconds`` pass."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if server.poll() is not None:
            server.stderr.seek(0)
            raise SystemExit(f"serve.py exited with {server.returncode}:\n{server.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit(f"serve.py did not answer {url}/api/health within {seconds:.0f} s")


def multipart(path: Path) -> tuple[bytes, str]:
    """The body and content type of a form with ``path`` in its ``file`` field."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def send(url: str, body: bytes, content_type: str) -> tuple[int, float]:
    """One upload: (HTTP status, seconds until the whole answer is read)."""
    request = urllib.request.Request(f"{url}/api/segment", data=body, headers={"Content-Type": content_type})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as exc:
        exc.read()
        status = exc.code
    return status, time.perf_counter() - t0


def load(url: str, image: Path, requests: int, clients: int) -> dict:
    """``requests`` uploads of ``image`` from ``clients`` threads at once."""
    body, content_type = multipart(image)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda _: send(url, body, content_type), range(requests)))
    wall = time.perf_counter() - t0
    seconds = [s for _, s in done]
    codes: dict[str, int] = {}
    for status, _ in done:
        codes[str(status)] = codes.get(str(status), 0) + 1
    return {"clients": clients, "requests": requests, "status": codes, "median_s": round(statistics.median(seconds), 3),
            "max_s": round(max(seconds), 3), "per_s": round(requests / wall, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True, type=Path, help="the file every request uploads")
    p.add_argument("--requests", type=int, default=8, help="per round")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="clients at once, one round each")
    p.add_argument("--device", default="auto")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds for the server to load its model")
    p.add_argument("--json", help="write the rounds here too")
    args = p.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: the server's log never fills a buffer and stalls it
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", args.checkpoint,
                               "--port", str(port), "--device", args.device], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=log, text=True)
    server.stderr = log
    try:
        wait_until_up(url, server, args.start_timeout)
        send(url, *multipart(args.image))  # the first request pays for warm-up (kernels, allocator)
        rounds = [load(url, args.image, args.requests, c) for c in args.clients]
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    for r in rounds:
        print(f"{r['clients']} client(s): {r['requests']} requests, status {r['status']}, median {r['median_s']} s, "
              f"slowest {r['max_s']} s, {r['per_s']} requests/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "image": str(args.image), "rounds": rounds},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
