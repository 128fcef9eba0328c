"""The stats page and the API docs: served from the package, drawn in a real Chromium.

The browser test drives Debian's chromium through the system chromedriver (packages
`chromium` and `chromium-driver`) and is skipped when they are missing. Records are made in
the test, and the summary the page shows is checked against figures computed here.

`python -m tests.statsd_server.test_web [LOG] [PNG]` writes docs/screenshot.png: the page
for cust_1 over api_requests.log (`make run`'s data set) on a real server.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import math
import random
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
STATIC = ROOT / "statsd_server" / "web" / "static"
TODAY = dt.datetime.now(dt.UTC).date()
# Series colours in app.js: the bars (successful, 4xx, 5xx), uptime and average, median, p99.
COLORS = {
    "ok": (47, 158, 68),
    "client": (240, 140, 0),
    "server": (224, 49, 49),
    "blue": (28, 126, 214),
    "median": (112, 72, 232),
    "p99": (232, 89, 12),
}


def fetch(
    server: Server, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET one path; the status, lower-cased headers and raw body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Assets(HTMLParser):
    """The scripts, stylesheets and icons an HTML page loads."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        url = found.get("src") if tag == "script" else found.get("href")
        if tag in ("script", "link") and url:
            self.urls.append(url)


def assets_of(html: bytes) -> list[str]:
    parser = Assets()
    parser.feed(html.decode())
    return parser.urls


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the module (server_factory's Server, started once)."""
    started = Server(data_dir=tmp_path_factory.mktemp("web") / "data", shards=2).start()
    try:
        yield started
    finally:
        started.stop()


def test_pages_and_their_files_are_served_locally(server: Server) -> None:
    """/ and /docs load only files of this server, each with its type and cache policy."""
    for page, library in (("/", "uplot-1.6.32"), ("/docs", "rapidoc-9.3.8")):
        status, headers, html = fetch(server, page)
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert headers["cache-control"] == "no-cache"
        assert "default-src 'self'" in headers["content-security-policy"]
        assert b"http://" not in html and b"https://" not in html
        urls = assets_of(html)
        assert any(library in url for url in urls), urls
        for url in urls:
            assert "//" not in url and not url.startswith("/"), url  # same origin, relative
            if url.startswith("data:"):
                continue
            status, headers, body = fetch(server, "/" + url)
            assert status == 200 and body, url
            kind = "text/javascript" if url.endswith(".js") else "text/css"
            assert headers["content-type"] == f"{kind}; charset=utf-8", url
            assert headers["x-content-type-options"] == "nosniff"
            vendored = url.startswith("static/vendor/")
            assert headers["cache-control"] == (
                "public, max-age=31536000, immutable" if vendored else "no-cache"
            ), url
    # The page's own code fetches nothing from elsewhere either.
    for name in ("app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text, name


def test_vendored_libraries_ship_with_their_licenses(server: Server) -> None:
    """Each vendored library directory holds its license, served as text."""
    for library, license_file in (("uplot-1.6.32", "LICENSE"), ("rapidoc-9.3.8", "LICENSE.txt")):
        status, headers, body = fetch(server, f"/static/vendor/{library}/{license_file}")
        assert status == 200 and b"MIT License" in body
        assert headers["content-type"] == "text/plain; charset=utf-8"


def test_static_files_revalidate_and_stay_inside(server: Server) -> None:
    """ETag revalidation answers 304; paths outside the static directory are 404."""
    status, headers, _ = fetch(server, "/static/app.js")
    assert status == 200
    status, _, body = fetch(server, "/static/app.js", {"If-None-Match": headers["etag"]})
    assert status == 304 and body == b""
    for path in ("/static/%2e%2e/front.py", "/static/..%2f__init__.py", "/static/", "/static/x"):
        status, headers, _ = fetch(server, path)
        assert status == 404 and headers["content-type"].startswith("application/json"), path


# --- the page in a browser -----------------------------------------------------------------


@contextlib.contextmanager
def chromium(profile: Path, width: int = 1280, height: int = 1000) -> Iterator[Any]:
    """Headless Debian Chromium through the system chromedriver, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        # Without these, chromium waits on the network it can't reach (closed CI network).
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"no {' or '.join(missing)}: the browser test needs Debian's chromium and "
            "chromium-driver (apt-get install -y chromium chromium-driver)"
        )
    with chromium(tmp_path / "chromium-profile") as driver:
        yield driver


@dataclass(frozen=True)
class Rec:
    day: dt.date
    second: int
    status: int
    millis: int

    def line(self, customer: str) -> str:
        when = dt.datetime.combine(self.day, dt.time(), dt.UTC) + dt.timedelta(seconds=self.second)
        return f"{when:%Y-%m-%d %H:%M:%S} {customer} /api/v1/x {self.status} {self.millis / 1000:.3f}\n"


def make_records(rng: random.Random, days: list[dt.date]) -> list[Rec]:
    statuses = [200, 200, 200, 201, 204, 302, 400, 401, 404, 429, 500, 502, 503]
    return [
        Rec(day, rng.randrange(86400), rng.choice(statuses), rng.randint(5, 2500))
        for day in days
        for _ in range(rng.randint(1, 40))
    ]


def expected_summary(recs: list[Rec]) -> dict[str, float]:
    """The summary's figures, computed here: counts, uptime, mean, nearest-rank quantiles."""
    n = len(recs)
    server = sum(r.status >= 500 for r in recs)
    client = sum(400 <= r.status < 500 for r in recs)
    millis = sorted(r.millis for r in recs)
    return {
        "total_requests": n,
        "successful_requests": n - server - client,
        "failed_requests": server + client,
        "client_errors": client,
        "server_errors": server,
        "uptime_pct": round(100 * (n - server) / n, 3),
        "avg_latency_ms": sum(millis) / n,
        "median_latency_ms": millis[math.ceil(0.5 * n) - 1],
        "p99_latency_ms": millis[math.ceil(0.99 * n) - 1],
    }


def shown_number(text: str) -> float:
    """A figure as the page prints it: '1,234', '92.857 %', '1,172.6 ms'."""
    match = re.fullmatch(r"([0-9,]+(?:\.[0-9]+)?)(?: %| ms)?", text.strip())
    assert match, text
    return float(match[1].replace(",", ""))


def summary_shown(driver: Any) -> dict[str, str]:
    return dict(
        driver.execute_script(
            "return [...document.querySelectorAll('#summary [data-field]')]"
            ".map(el => [el.dataset.field, el.textContent])"
        )
    )


def wait_for(driver: Any, condition: Any, timeout: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def wait_for_total(driver: Any, total: int) -> None:
    wait_for(driver, lambda d: summary_shown(d).get("total_requests") == f"{total:,}")


# Per chart: canvas size, painted pixels, and the pixels of each series colour exactly.
CANVAS_PIXELS = """
return [...document.querySelectorAll('.chart')].map(chart => {
  const canvas = chart.querySelector('canvas');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const colors = arguments[0];
  const counts = Object.fromEntries(Object.keys(colors).map(k => [k, 0]));
  let painted = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] === 0) continue;
    painted++;
    for (const [name, [r, g, b]] of Object.entries(colors)) {
      if (data[i] === r && data[i + 1] === g && data[i + 2] === b) counts[name]++;
    }
  }
  return {id: chart.id, width: canvas.width, height: canvas.height, painted, counts};
});
"""


def test_page_draws_a_customer_in_chromium(server: Server, browser: Any) -> None:
    """The page charts a customer and shows the summary computed here; links, form, errors work.

    A link with only `?customer=` opens the last 30 days; the form updates the URL and Back
    returns to the previous view; API errors are shown; /docs renders the spec.
    """
    from selenium.webdriver.common.by import By

    rng = random.Random(11)
    recent = [TODAY - dt.timedelta(days=i) for i in range(1, 15)]
    customers = {
        "tenant:7/prod": make_records(rng, rng.sample(recent, 9)),
        "cust_b": make_records(rng, rng.sample(recent, 4)),
    }
    lines = "".join(r.line(c) for c, recs in customers.items() for r in recs)
    assert server.send_tcp(lines.encode())["accepted"] == lines.count("\n")
    base = f"http://127.0.0.1:{server.http_port}/"

    # A link with only the customer: the default range is the last 30 days, today included.
    first, recs = "tenant:7/prod", customers["tenant:7/prod"]
    browser.get(base + "?" + urllib.parse.urlencode({"customer": first}))
    wait_for_total(browser, len(recs))
    assert browser.find_element(By.ID, "from").get_attribute("value") == str(
        TODAY - dt.timedelta(days=29)
    )
    assert browser.find_element(By.ID, "to").get_attribute("value") == str(TODAY)

    shown = summary_shown(browser)
    for field, value in expected_summary(recs).items():
        tolerance = 0.05 + 1e-9 if field == "avg_latency_ms" else 0  # printed to 0.1 ms
        assert shown_number(shown[field]) == pytest.approx(value, abs=tolerance), field
    days = sorted({r.day for r in recs})
    assert browser.find_element(By.ID, "days-with-requests").text == f"{len(days)} of 30"
    rows = browser.find_elements(By.CSS_SELECTOR, "#daily tbody tr")
    assert [row.find_element(By.TAG_NAME, "td").get_attribute("textContent") for row in rows] == [
        str(d) for d in days
    ]

    charts = browser.execute_script(CANVAS_PIXELS, COLORS)
    assert [c["id"] for c in charts] == ["chart-requests", "chart-uptime", "chart-latency"]
    for chart in charts:
        assert chart["width"] > 300 and chart["height"] > 100, chart
        assert chart["painted"] > 1000, chart
    # Each series is drawn: bars in their colours, lines with their points.
    drawn = {chart["id"]: {k for k, n in chart["counts"].items() if n > 20} for chart in charts}
    assert drawn == {
        "chart-requests": {"ok", "client", "server"},
        "chart-uptime": {"blue"},
        "chart-latency": {"blue", "median", "p99"},
    }
    legend = browser.find_element(By.CSS_SELECTOR, "#chart-requests .u-legend").text
    assert "Successful" in legend and "Failed (4xx)" in legend and "Failed (5xx)" in legend
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []  # nothing blocked by the CSP, no script errors, no missing files

    # Typing another customer: the URL follows; Back returns to the first one.
    box = browser.find_element(By.ID, "customer")
    box.clear()
    box.send_keys("cust_b")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for_total(browser, len(customers["cust_b"]))
    assert "customer=cust_b" in browser.current_url
    browser.back()
    wait_for_total(browser, len(recs))

    # Errors from the API are shown, not swallowed.
    box.clear()
    box.send_keys("nobody")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    error = browser.find_element(By.ID, "error")
    wait_for(browser, lambda d: error.is_displayed())
    assert error.text == "404: unknown customer 'nobody' (never seen, or its data expired)"
    assert not browser.find_element(By.ID, "result").is_displayed()
    browser.get(base + f"?customer=cust_b&from={TODAY}&to={TODAY - dt.timedelta(days=3)}")
    wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert browser.find_element(By.ID, "error").text.startswith("400: 'to' (")

    # The docs page renders every operation of the spec from the local RapiDoc.
    browser.get_log("browser")  # drop the entries of the failed requests above
    browser.get(base + "docs")
    rendered = (
        "const doc = document.querySelector('rapi-doc');"
        "return doc && doc.shadowRoot ? doc.shadowRoot.textContent : '';"
    )
    wait_for(browser, lambda d: "/customers/{customer_id}/stats" in d.execute_script(rendered))
    text = browser.execute_script(rendered)
    for path in ("/ingest", "/health", "/ready", "/openapi.json"):
        assert path in text, path
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


# --- docs/screenshot.png -------------------------------------------------------------------


def save_screenshot(log_file: Path, out: Path, customer: str) -> None:
    """Serve `log_file`, open `customer` over its last 30 days, save the whole page."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    dates = {line[:10] for line in log_file.read_text().splitlines() if line[:1].isdigit()}
    last = dt.date.fromisoformat(max(dates))
    query = {"customer": customer, "from": str(last - dt.timedelta(days=29)), "to": str(last)}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(data_dir=Path(tmp) / "data").start()
        try:
            print(server.send_tcp(log_file.read_bytes()))
            with chromium(Path(tmp) / "profile", width=1280, height=900) as driver:
                driver.get(f"http://127.0.0.1:{server.http_port}/?{urllib.parse.urlencode(query)}")
                wait_for(driver, lambda d: summary_shown(d).get("total_requests"))
                # A viewport as tall as the page: all of it in the picture, and pointing
                # at the chart below scrolls nothing.
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.execute_cdp_cmd(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False},
                )
                # Point at a day of the requests chart, so its legend shows that day's counts.
                over = driver.find_element(By.CSS_SELECTOR, "#chart-requests .u-over")
                ActionChains(driver).move_to_element_with_offset(
                    over, over.size["width"] // 4, 0
                ).perform()
                out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(out))
        finally:
            server.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the page's screenshot for the README.")
    parser.add_argument("log", nargs="?", type=Path, default=ROOT / "api_requests.log")
    parser.add_argument("png", nargs="?", type=Path, default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--customer", default="cust_1")
    args = parser.parse_args()
    save_screenshot(args.log, args.png, args.customer)
