"""The web console (/ui) in a real browser: Playwright drives Debian's Chromium (headless, the
system browser, nothing downloaded) against a real `lmfleet serve` and a `--replicas 2` cluster
endpoint. The page's chat text is checked against the API's own answer to the same request, its
dashboard against /v1/stats, and /v1/stats against /metrics. Screenshots of each view are saved
under the test's tmp dir (`console-*.png`)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import chat_model_dir, require_tool, serve_process, stop_process

pytestmark = pytest.mark.integration
NAME = "tiny-console"
KEY = "console-key-5d1e0c7a"
# Chromium logs every HTTP error status of a fetch as a console error: the wrong-key step's 401 is
# the one such line the test expects (matched exactly, once); anything else fails the test.
EXPECTED_401 = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    # A long context, so that a long answer lasts long enough to be stopped by hand.
    return chat_model_dir(tmp_path_factory.mktemp("console"), tokenizer, 4096, 7)


@pytest.fixture(scope="module")
def browser():
    chromium = require_tool("chromium", "chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


class Console:
    """A page on the console with everything the browser reported collected."""

    def __init__(self, browser, url: str, **context):
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(m.text))
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(f"{url}/ui")

    def tile(self, name: str) -> str:
        return self.page.locator(f'[data-tile="{name}"]').inner_text()

    def close(self) -> None:
        self.context.close()


def _samples(text: str) -> dict[str, float]:
    """Sample name (with its labels) -> value, summed over replicas."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("replica", "model_name"))
            out[f"{s.name}{{{labels}}}"] = out.get(f"{s.name}{{{labels}}}", 0.0) + s.value
    return out


def assert_stats_agree_with_metrics(url: str, headers: dict[str, str]) -> dict:
    """/v1/stats and /metrics, read one after the other with no traffic between: the same counters."""
    stats = httpx.get(f"{url}/v1/stats", headers=headers, timeout=10).json()
    metrics = _samples(httpx.get(f"{url}/metrics", headers=headers, timeout=10).text)
    total = lambda prefix: sum(v for k, v in metrics.items() if k.startswith(prefix + "{"))  # noqa: E731
    assert stats["requests"]["success_total"] == total("lmfleet:request_success_total")
    assert stats["tokens"]["generation_total"] == total("lmfleet:generation_tokens_total")
    assert stats["tokens"]["prompt_total"] == total("lmfleet:prompt_tokens_total")
    assert stats["prefix_cache"]["hits_total"] == total("lmfleet:prefix_cache_hits_total")
    assert stats["requests"]["errors_total"] == total("lmfleet:http_errors_total") + total(
        "lmfleet:ingress_http_errors_total")
    for key, name in (("time_to_first_token", "lmfleet:time_to_first_token_seconds"),
                      ("inter_token", "lmfleet:inter_token_latency_seconds")):
        histogram = stats["latency_seconds"][key]
        assert histogram["count"] == total(f"{name}_count") and histogram["sum"] == pytest.approx(total(f"{name}_sum"))
        for bound, count in histogram["buckets"]:
            le = "+Inf" if bound == "+Inf" else repr(float(bound))
            assert count == metrics[f"{name}_bucket{{le={le}}}"], (name, bound)
    return stats


def wait_for(check, timeout_s: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def test_stats_quantiles_are_prometheus_histogram_quantile() -> None:
    """Hand-computed with Prometheus's rule: linear within the bucket that holds the rank, the
    largest finite bound when it falls in +Inf, nothing without observations."""
    from lmfleet.serve.stats import histogram_quantile

    inf = float("inf")
    assert histogram_quantile(0.5, [(0.1, 2), (0.2, 4), (inf, 4)]) == 0.1
    assert histogram_quantile(0.75, [(0.1, 2), (0.2, 4), (inf, 4)]) == pytest.approx(0.15)
    assert histogram_quantile(0.99, [(0.1, 0), (0.2, 1), (inf, 3)]) == 0.2
    assert histogram_quantile(0.5, [(0.1, 0), (inf, 0)]) is None
    assert histogram_quantile(0.5, [(inf, 4), (0.1, 0), (0.2, 4)]) == pytest.approx(0.15)  # order of the buckets does not matter


def test_console_asks_for_the_key_streams_stops_and_shows_the_servers_numbers(model_dir, browser, tmp_path) -> None:
    proc, url = serve_process(model_dir, "--api-key", KEY, "--served-model-name", NAME, "--kv-cache-memory", "16MiB",
                              "--log-level", "warning")
    auth = {"Authorization": f"Bearer {KEY}"}
    console = None
    try:
        denied = httpx.get(f"{url}/v1/stats", timeout=10)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        console = Console(browser, url)
        page = console.page
        # The page asks for the key before any request; a wrong key gets a clear message.
        page.get_by_role("textbox", name="API key").wait_for()
        assert page.locator("main").is_hidden()
        page.screenshot(path=tmp_path / "console-key.png")
        page.get_by_role("textbox", name="API key").fill("wrong-key-0000")
        page.get_by_role("button", name="Use key").click()
        message = page.locator("#auth-message")
        wait_for(lambda: "not accepted" in message.inner_text(), what="the wrong-key message")
        assert "401" in message.inner_text() and page.locator("main").is_hidden()
        page.get_by_role("textbox", name="API key").fill(KEY)
        page.get_by_role("button", name="Use key").click()
        page.locator("#model").get_by_text(NAME).wait_for(state="attached")
        assert page.locator("main").is_visible() and page.locator("#auth").is_hidden()
        assert page.evaluate("document.activeElement.id") == "prompt"  # ready to type
        # Kept for the browser session only: sessionStorage, nothing in localStorage or cookies.
        assert page.evaluate("sessionStorage.getItem('lmfleet.apiKey')") == KEY
        assert page.evaluate("localStorage.length") == 0 and console.context.cookies() == []

        # A chat message: the streamed answer is what the API answers the same request.
        page.locator("#temperature").fill("0")
        page.locator("#max-tokens").fill("24")
        page.locator("#system").fill("You are terse.")
        page.locator("#prompt").fill("Tell me about foxes")
        page.locator("#prompt").press("Enter")
        answer = page.locator("li.message.assistant").last
        wait_for(lambda: answer.get_attribute("data-finish"), what="the first answer's finish")
        assert answer.get_attribute("data-finish") == "length"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        reference = client.chat.completions.create(
            model=NAME, max_tokens=24, temperature=0, top_p=1,
            messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about foxes"}])
        assert answer.locator(".content").inner_text() == reference.choices[0].message.content
        meta = answer.locator(".meta").inner_text()
        assert "24 tokens" in meta and "TTFT" in meta and "finish: length" in meta, meta
        assert float(answer.get_attribute("data-ttft-ms")) > 0
        page.screenshot(path=tmp_path / "console-chat.png")

        # A long answer: text grows while it streams; Stop ends it and the server stops generating.
        generated_before = httpx.get(f"{url}/v1/stats", headers=auth).json()["tokens"]["generation_total"]
        page.locator("#max-tokens").fill("3000")
        page.locator("#ignore-eos").check()
        page.locator("#prompt").fill("Now talk for a long time")
        page.get_by_role("button", name="Send").click()
        long_answer = page.locator("li.message.assistant").last
        wait_for(lambda: long_answer.locator(".content").inner_text(), what="the long answer's first text")
        lengths = []
        for _ in range(4):
            lengths.append(len(long_answer.locator(".content").inner_text()))
            time.sleep(0.3)
        assert lengths == sorted(lengths) and lengths[-1] > lengths[0] > 0, lengths  # streamed, not all at once
        page.get_by_role("button", name="Stop").click()
        wait_for(lambda: long_answer.get_attribute("data-finish") == "stopped", what="the stop")
        stopped_at = len(long_answer.locator(".content").inner_text())
        time.sleep(1.0)
        assert len(long_answer.locator(".content").inner_text()) == stopped_at
        assert page.get_by_role("button", name="Send").is_enabled()
        def idle() -> bool:
            requests = httpx.get(f"{url}/v1/stats", headers=auth).json()["requests"]
            return requests["running"] + requests["waiting"] == 0

        wait_for(idle, what="the stopped request leaving the engine")
        generated = httpx.get(f"{url}/v1/stats", headers=auth).json()["tokens"]["generation_total"] - generated_before
        time.sleep(1.0)
        assert httpx.get(f"{url}/v1/stats", headers=auth).json()["tokens"]["generation_total"] - generated_before == \
            generated  # nothing more generated once stopped
        assert 0 < generated < 3000 and stopped_at > 0  # aborted, not run to its 3000 tokens
        page.screenshot(path=tmp_path / "console-stopped.png")

        # The dashboard: its numbers move with requests sent by another client.
        page.get_by_role("tab", name="Dashboard").click()
        assert page.locator("#chat").is_hidden()
        wait_for(lambda: console.tile("requests-total") not in ("", "–"), what="the dashboard's first numbers")
        before = float(console.tile("requests-total"))
        tokens_before = float(console.tile("tokens-total"))
        for prompt in ("one", "two", "three"):
            client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
        wait_for(lambda: float(console.tile("requests-total")) == before + 3, what="the dashboard's request count")
        assert float(console.tile("tokens-total")) > tokens_before
        stats = assert_stats_agree_with_metrics(url, auth)
        assert float(console.tile("requests-total")) == stats["requests"]["success_total"]
        assert console.tile("replicas").startswith("1 / 1")
        assert page.locator("#replica-rows tr").count() == 1 and page.locator("#replica-rows .healthy").count() == 1
        time.sleep(2.5)  # one more poll, so that the charts have drawn the requests
        page.screenshot(path=tmp_path / "console-dashboard.png", full_page=True)
        # Readable on a narrow screen: nothing wider than the viewport.
        page.set_viewport_size({"width": 380, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 380, page.evaluate(
            "[...document.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right > 380)"
            ".map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + e.getBoundingClientRect().right)")
        page.get_by_role("tab", name="Chat").click()
        assert page.evaluate("document.documentElement.scrollWidth") <= 380
        page.screenshot(path=tmp_path / "console-narrow.png", full_page=True)
        # Keyboard: the tabs switch with the arrow keys.
        page.get_by_role("tab", name="Chat").focus()
        page.keyboard.press("ArrowRight")
        assert page.locator("#dashboard").is_visible() and page.locator("#chat").is_hidden()
        assert page.get_by_role("tab", name="Dashboard").get_attribute("aria-selected") == "true"
        page.keyboard.press("Home")
        assert page.locator("#chat").is_visible() and page.evaluate("document.activeElement.id") == "tab-chat"

        # The dashboard's arithmetic, against hand-computed values: Prometheus's histogram_quantile,
        # and increases per replica where one restarted (counter down: counts from 0) and one appeared.
        assert page.evaluate("quantile(0.5, [[0.1, 2], [0.2, 4], [Infinity, 4]])") == 0.1
        assert page.evaluate("quantile(0.75, [[0.1, 2], [0.2, 4], [Infinity, 4]])") == pytest.approx(0.15)
        assert page.evaluate("quantile(0.99, [[0.1, 0], [0.2, 1], [Infinity, 3]])") == 0.2  # in +Inf: last bound
        before = {"replicas": [{"id": "a", "success_total": 10, "ttft_buckets": [[0.1, 5], ["+Inf", 10]]},
                               {"id": "b", "success_total": 7, "ttft_buckets": [[0.1, 7], ["+Inf", 7]]}]}
        after = {"replicas": [{"id": "a", "success_total": 3, "ttft_buckets": [[0.1, 1], ["+Inf", 3]]},  # restarted
                              {"id": "b", "success_total": 9, "ttft_buckets": [[0.1, 7], ["+Inf", 9]]},
                              {"id": "c", "success_total": 50, "ttft_buckets": [[0.1, 50], ["+Inf", 50]]}]}  # new
        args = {"now": after, "base": before}
        assert page.evaluate("a => replicasIncrease(a.now, a.base, 'success_total')", args) == 3 + 2
        assert page.evaluate("a => bucketsIncrease(a.now, a.base, 'ttft_buckets')", args) == [[0.1, 1], [float("inf"), 5]]

        assert console.problems == [EXPECTED_401], console.problems
        assert all(u.startswith(url + "/") for u in console.requests), [u for u in console.requests
                                                                         if not u.startswith(url)]
        # Another browser session starts without the key.
        fresh = Console(browser, url)
        fresh.page.get_by_role("textbox", name="API key").wait_for()
        assert fresh.page.evaluate("sessionStorage.length") == 0 and fresh.problems == []
        fresh.close()
    finally:
        if console is not None:
            console.close()
        stop_process(proc)


def test_console_on_a_cluster_shows_both_replicas_and_chats(model_dir, browser, tmp_path) -> None:
    proc, url = serve_process(model_dir, "--replicas", "2", "--served-model-name", NAME, "--kv-cache-memory", "16MiB",
                              "--log-level", "warning", timeout=240)
    console = None
    try:
        console = Console(browser, url)
        page = console.page
        page.locator("#model").get_by_text(NAME).wait_for(state="attached")
        assert page.locator("#auth").is_hidden()  # an open server: no key asked
        page.locator("#temperature").fill("0")
        page.locator("#max-tokens").fill("12")
        page.locator("#prompt").fill("hello cluster")
        page.locator("#prompt").press("Enter")
        answer = page.locator("li.message.assistant").last
        wait_for(lambda: answer.get_attribute("data-finish"), timeout_s=60, what="the answer's finish")
        reference = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": NAME, "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": "hello cluster"}]})
        assert answer.locator(".content").inner_text() == reference.json()["choices"][0]["message"]["content"]
        page.get_by_role("tab", name="Dashboard").click()
        rows = page.locator("#replica-rows tr")
        wait_for(lambda: rows.count() == 2 and page.locator("#replica-rows .healthy").count() == 2
                 and console.tile("replicas").startswith("2 / 2"), timeout_s=30, what="two healthy running replicas")
        stats = httpx.get(f"{url}/v1/stats", timeout=10).json()
        assert sorted(r.get_attribute("data-replica") for r in rows.all()) == sorted(r["id"] for r in stats["replicas"])
        assert stats["num_replicas"] == 2 and all(r["healthy"] for r in stats["replicas"])
        expected = int(re.search(r"(\d+) tokens", answer.locator(".meta").inner_text()).group(1)) + \
            reference.json()["usage"]["completion_tokens"]
        wait_for(lambda: httpx.get(f"{url}/v1/stats").json()["tokens"]["generation_total"] == expected
                 and _samples(httpx.get(f"{url}/metrics").text).get("lmfleet:generation_tokens_total{}") == expected,
                 timeout_s=15, what="both answers in the cluster's counters")
        time.sleep(1.5)  # past the stats cache (1 s): both read the same pushes now that nothing runs
        assert_stats_agree_with_metrics(url, {})
        # Console paths are the ingress's own: never forwarded to a replica, whatever the method.
        posted = httpx.post(f"{url}/ui", content=b"x" * 1000, timeout=10)
        assert posted.status_code == 405 and posted.json()["error"]["message"].startswith("POST /ui")
        time.sleep(2.5)
        page.screenshot(path=tmp_path / "console-cluster.png", full_page=True)
        assert console.problems == [], console.problems
    finally:
        if console is not None:
            console.close()
        stop_process(proc)
    print(f"screenshots: {sorted(str(p) for p in Path(tmp_path).glob('console-*.png'))}")
