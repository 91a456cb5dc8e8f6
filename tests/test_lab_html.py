"""The HTML report: self-contained, every table and figure; headless Chromium renders every figure with no
console error (checked through the DevTools protocol; skipped where Chromium is not installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

import lab_fakes
from kvlab.lab.criteria import check
from kvlab.lab.frame import rows_frame
from kvlab.lab.html import render_html, write_html
from kvlab.lab.report import build_tables

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--remote-debugging-port=0"]
FIGURES_JS = "JSON.stringify(Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]))"


def rows():
    return [r for r in lab_fakes.paper_rows() if r["eval"] == "needle" or "pg19" in str(r["config"]["params"])][:60]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    data = rows()
    df = rows_frame(data)
    path = tmp_path_factory.mktemp("html") / "report.html"
    return write_html(data, build_tables(df), path, criteria=check(df), dpi=40)


def test_page_is_self_contained_with_every_table_and_figure(page):
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from anywhere
    assert text.count('<img alt="') == len(re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]{100,}", text)) >= 6
    for name in ("main_comparison", "ablation_window_size", "ablation_n_sink", "needle_heatmap"):
        assert f'id="fig-{name}"' in text
    for table in ("ppl_summary", "ppl_method_x_tokens", "needle_summary"):
        assert f'id="{table}"' in text
    assert "head_class_map: no row" in text  # skipped figures are listed with the reason
    assert "Success criteria" in text and ">PASS<" in text


def test_values_are_escaped():
    bad = lab_fakes.row("ppl", "<script>alert(1)</script>", "full", {"tokens": 8}, {"ppl": 2.0})
    text = render_html([bad], build_tables(rows_frame([bad])), {})
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;" in text


def _error_text(event: dict) -> str | None:
    """The message of a console error, an uncaught exception or an error log entry; None otherwise."""
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params["exceptionDetails"]
        return details.get("exception", {}).get("description") or details.get("text", "exception")
    if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
        return "console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
    if method == "Log.entryAdded" and params["entry"]["level"] == "error":
        return "log: " + params["entry"]["text"]
    return None


class Browser:
    """Headless Chromium driven through its DevTools protocol (a websocket on 127.0.0.1)."""

    def __init__(self, profile: Path) -> None:
        websocket = pytest.importorskip("websocket", reason="the browser test needs websocket-client")
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            assert time.monotonic() < deadline, f"no {event}"
            self.events.append(json.loads(self.ws.recv()))

    def open(self, path: Path) -> tuple[list, list[str]]:
        """Load a page; return [(alt, complete, naturalWidth)] of its images and its console errors."""
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        images = json.loads(self.call("Runtime.evaluate", expression=FIGURES_JS)["result"]["value"])
        self.call("Runtime.evaluate", expression="1")  # flush the events queued by the load
        return images, [text for text in map(_error_text, self.events) if text]

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def test_every_figure_renders_without_console_errors(page, browser):
    images, errors = browser.open(page)
    assert len(images) >= 6 and all(complete and width > 0 for _, complete, width in images), images
    assert errors == []


def test_the_browser_check_sees_a_broken_figure_and_a_script_error(tmp_path, browser):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><script>console.error("boom"); missing();</script></head><body>'
                   '<figure><img alt="x" src="data:image/png;base64,AAAA"></figure></body></html>')
    images, errors = browser.open(bad)
    assert images == [["x", True, 0]]
    assert len(errors) >= 2 and any("boom" in e for e in errors) and any("missing" in e for e in errors)
