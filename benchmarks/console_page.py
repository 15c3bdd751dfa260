"""The web console (/ui): what a first load costs, and whether the time to first token the page
shows is what an API client measures against the same server.

- **Page weight**: Chromium (Debian's, through Playwright) opens /ui on a fresh context; every
  response's transferred size (headers + body, as the browser counts them) is summed over the
  first load (page, styles, script, /ui/console.json, /v1/models and the first /v1/stats), and
  requests to any other origin are counted (goal: under 200 KB, none elsewhere).
- **TTFT**: the same chat request (greedy, --max-tokens) is sent --rounds times by the page (its
  own reading: `performance.now()` from the click's send to the first streamed token on screen)
  and by an httpx streaming client in this process over a kept-alive connection (from sending to
  the first content chunk), alternating; prints the best and median of each and their ratio.

    python benchmarks/console_page.py                     # a random-init `tiny` model
    python benchmarks/console_page.py --model runs/quickstart/tiny/final

prints JSON lines and a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import free_port, random_model, stop, wait_healthy

LMFLEET = str(Path(sys.executable).with_name("lmfleet"))


def api_ttft(client: httpx.Client, url: str, body: dict) -> float:
    """Seconds from sending the request to the first streamed content chunk (a kept-alive
    connection, as the browser's)."""
    started, ttft = time.perf_counter(), None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        response.raise_for_status()
        for line in response.iter_lines():  # to the end, as the page reads it
            if ttft is None and line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - started
    if ttft is None:
        raise RuntimeError("the answer streamed no text: raise --max-tokens or use another model")
    return ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: a random-init `tiny` model)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model(Path(tmp) / "tiny", "tiny", [], 8192)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([LMFLEET, "serve", str(model), "--port", str(port), "--served-model-name", "m",
                                   "--log-level", "warning"])
        try:
            wait_healthy(url)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
                page = browser.new_context().new_page()
                responses = []
                page.on("requestfinished", lambda r: responses.append(r))
                page.goto(f"{url}/ui")
                page.locator("#model option").first.wait_for(state="attached")
                page.wait_for_function("document.querySelector('[data-tile=\"requests-total\"]') !== null")
                sizes = {r.url.removeprefix(url): r.sizes() for r in responses}
                weight = sum(s["responseBodySize"] + s["responseHeadersSize"] for s in sizes.values())
                elsewhere = [u for u in sizes if u.startswith("http")]
                print(json.dumps({"page_weight_bytes": weight, "requests": len(sizes), "external_requests": len(elsewhere),
                                  "by_url": {u: s["responseBodySize"] + s["responseHeadersSize"]
                                             for u, s in sizes.items()}}))
                page.locator("#temperature").fill("0")
                page.locator("#max-tokens").fill(str(args.max_tokens))
                body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "stream": True,
                        "stream_options": {"include_usage": True}, "temperature": 0, "top_p": 1,
                        "max_tokens": args.max_tokens}
                client = httpx.Client()
                api_ttft(client, url, body)  # warm-up, both paths
                page_times, api_times = [], []
                for i in range(args.rounds + 1):
                    page.locator("#new-chat").click()
                    page.locator("#prompt").fill("hello there")
                    page.locator("#prompt").press("Enter")
                    answer = page.locator("li.message.assistant").last
                    answer.and_(page.locator("[data-finish]")).wait_for(state="attached")
                    if i:  # the first page round is a warm-up
                        page_times.append(float(answer.get_attribute("data-ttft-ms")) / 1000)
                        api_times.append(api_ttft(client, url, body))
                browser.close()
        finally:
            stop(server)
    best_page, best_api = min(page_times), min(api_times)
    result = {"page_ttft_s": {"best": best_page, "median": statistics.median(page_times)},
              "api_ttft_s": {"best": best_api, "median": statistics.median(api_times)},
              "ratio_best": best_page / best_api, "ratio_median": statistics.median(page_times) /
              statistics.median(api_times), "rounds": args.rounds, "max_tokens": args.max_tokens}
    print(json.dumps(result))
    print(f"\nmachine: {platform.processor() or platform.machine()}, model: {args.model or 'random tiny'}")
    print(f"page weight on first load: {weight / 1024:.1f} KiB in {len(sizes)} requests, "
          f"{len(elsewhere)} to other origins (goal < 200 KB, 0)")
    print(f"{'TTFT':<10}{'best ms':>10}{'median ms':>12}")
    print(f"{'page':<10}{1000 * best_page:>10.1f}{1000 * statistics.median(page_times):>12.1f}")
    print(f"{'API':<10}{1000 * best_api:>10.1f}{1000 * statistics.median(api_times):>12.1f}")
    print(f"{'ratio':<10}{best_page / best_api:>10.2f}{result['ratio_median']:>12.2f}")


if __name__ == "__main__":
    main()
