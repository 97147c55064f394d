"""A screenshot of serve.py's page after segmenting some files, in Debian's chromium (docs/serve_page.png).

    python benchmarks/serve_screenshot.py --checkpoint output/model.pt data/raw/synth_001.nii.gz --out page.png

Starts serve.py's app on a free port of 127.0.0.1 in a thread, opens the page in chromium through Playwright
(``executable_path``: never ``playwright install``), chooses the files, presses the button, waits for every card,
saves a full-page screenshot. tests/test_browser.py drives the page with the same helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(config: serve.ServeConfig) -> Iterator[str]:
    """serve.py's app under uvicorn on a free port of 127.0.0.1, in a thread; its address; stopped afterwards."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(serve.create_app(config), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}/"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def browser_page(url: str) -> Iterator[tuple]:
    """A chromium page opened at ``url`` with the model shown, and the list of addresses it requested."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
        try:
            yield page, requested
        finally:
            browser.close()


def segment(page, files: list[str], timeout_s: float = 300) -> list:
    """Choose ``files``, press the button, wait until each has a finished card; the cards."""
    page.set_input_files("#files", files)
    page.click("#go")
    page.wait_for_function(f"document.querySelectorAll('.card:not([data-state=working])').length === {len(files)}",
                           timeout=timeout_s * 1000)
    return page.query_selector_all(".card")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="+", help="images to segment on the page")
    p.add_argument("--checkpoint", default="output/model.pt")
    p.add_argument("--out", default="output/serve_page.png", help="the screenshot (PNG)")
    args = p.parse_args(argv)
    if CHROMIUM is None:
        print("error: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    with running(serve.ServeConfig(Path(args.checkpoint), device="cpu")) as url, browser_page(url) as (page, _):
        cards = segment(page, [str(Path(f).resolve()) for f in args.files])
        for card in cards:
            print(card.inner_text().replace("\n", " | ")[:200])
        page.screenshot(path=args.out, full_page=True)
    print(f"screenshot → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
