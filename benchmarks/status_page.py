"""Figures of the status page (#17): first paint and live updates, in headless Chromium.

Starts `fedtide simulate --serve 127.0.0.1:PORT` (a real process), opens the page in Debian's
Chromium (driven by Playwright) while the run goes on, and prints:
- first contentful paint and the time until the page shows the run's data (ms after navigation);
- per round, how long after the round ended (the server's clock) the page showed it (same
  machine, same clock): median and worst;
and saves a screenshot of the page at the run's end (``--screenshot FILE``).

Usage: python benchmarks/status_page.py [--screenshot docs/status-page.png] [--json] [-- SIMULATE FLAGS]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from browser import FLAGS, chromium_path  # noqa: E402  (the tests' browser set-up)

DEFAULT_FLAGS = ["--num-tasks", "5", "--rounds-per-task", "6", "--threads", "1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", metavar="FILE")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("flags", nargs="*", help="flags for fedtide simulate (after --)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        sys.exit("no Chromium: apt-get install chromium")
    port = free_port()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.Popen(
            [sys.executable, "-m", "fedtide.cli", "simulate", "--out", f"{tmp}/run", "--quiet",
             "--serve", f"127.0.0.1:{port}", *(args.flags or DEFAULT_FLAGS)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch_persistent_context(
                    f"{tmp}/profile", executable_path=executable, headless=True, args=FLAGS,
                    viewport={"width": 1280, "height": 800})
                page = browser.new_page()
                deadline = time.monotonic() + 120
                while True:  # the page is up once the run has built its scenario
                    try:
                        page.goto(url, timeout=2000)
                        break
                    except Exception:
                        if time.monotonic() > deadline or run.poll() is not None:
                            raise SystemExit("the run never served its page: " + run.stderr.read().decode()[-2000:])
                        time.sleep(0.2)
                opened = time.time()  # rounds that ended before the page was open say nothing of its updates
                page.wait_for_function("() => window.fedtideFirstData !== undefined", timeout=10_000)
                paint = page.evaluate("() => performance.getEntriesByName('first-contentful-paint')[0].startTime")
                first_data = page.evaluate("() => window.fedtideFirstData")
                ended: dict[int, float] = {}
                while run.poll() is None:
                    try:
                        status = json.loads(page.evaluate("async () => JSON.stringify(await (await fetch('/api/status')).json())"))
                        ended.update({r["round"]: r["ended"] for r in status["rounds"]})
                    except Exception:
                        pass  # the run ended between two looks
                    time.sleep(0.3)
                    if args.screenshot and len(ended) >= 2 and page.locator("#state").inner_text() == "running":
                        page.screenshot(path=args.screenshot, full_page=True)  # the newest view of the live run
                seen = page.evaluate("() => window.fedtideSeen")
                browser.close()
        finally:
            run.kill()
            run.wait()
    latencies = [seen[str(r)] / 1000 - t for r, t in ended.items() if str(r) in seen and t > opened]
    out = {"first_contentful_paint_ms": paint, "first_data_ms": first_data, "rounds_seen": len(latencies),
           "update_latency_median_s": statistics.median(latencies), "update_latency_max_s": max(latencies)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"first contentful paint: {paint:.0f} ms; the run's data shown after {first_data:.0f} ms (target < 2000)")
    print(f"round shown after it ended: median {out['update_latency_median_s']:.2f} s, worst "
          f"{out['update_latency_max_s']:.2f} s over {len(latencies)} rounds (target < 2 s)")
    if args.screenshot:
        print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
