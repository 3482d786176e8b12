"""`meshserve up`'s web console in a real browser: Debian's chromium, headless, driven by
selenium through Debian's chromium-driver (scripts/test.sh installs both; nothing is
downloaded). The mesh is the demo's InferenceServices (envoy-config/demo), its payload logs
going to a `meshserve log-sink` the test starts. The page reads the revisions, moves the
digits canary to 50% (and Envoy then routes about half of the requests to it), shows the
payload-log events, and runs "try it" on the demo's photo to the right digit with its heat map.
The browser's screenshot is saved as target/console-screenshot.png.
"""

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import MeshUp, Process

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "target" / "release" / "meshserve"
DEMO = REPO / "envoy-config" / "demo" / "inferenceservice.yaml"
PHOTO = REPO / "models" / "samples" / "digit_photo.jpg"
DIGITS_REQUEST = (REPO / "models" / "samples" / "sklearn_digits_v1_request.json").read_bytes()
SCREENSHOT = REPO / "target" / "console-screenshot.png"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# What this machine's closed network needs (no background fetches, no Google lookups).
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,1500",
]


def http(method, url, body=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    sink = Process([BINARY, "log-sink", "--port", "0", "--out", tmp / "payloads.jsonl"])
    deadline = time.monotonic() + 30
    while not (found := re.search(r"listening on http=(\S+)", "".join(sink.lines))):
        assert time.monotonic() < deadline, "log-sink did not start:\n" + "".join(sink.lines)
        time.sleep(0.05)
    # The demo as it is, but its storage named from the repository and its payload logs sent
    # to this test's sink (the demo's is on a fixed port).
    spec = tmp / "inferenceservice.yaml"
    spec.write_text(
        DEMO.read_text()
        .replace("file://../../", f"file://{REPO}/")
        .replace("http://127.0.0.1:8090", f"http://{found.group(1)}")
    )
    try:
        up = MeshUp(spec, tmp / "state", BINARY)
        try:
            up.console = "http://" + (tmp / "state" / "console-address").read_text().strip()
            up.state = tmp / "state"
            yield up
        finally:
            up.stop()
    finally:
        sink.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("Debian's chromium and chromium-driver are needed (scripts/test.sh installs them)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, what, condition, timeout=30):
    # The page rewrites what it shows every second: an element read between two polls may
    # have been replaced.
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: condition(d), message=f"waited {timeout} s for {what}"
    )


def cell(driver, revision, field):
    """A revision's cell, read in one script call (no element handle to go stale)."""
    return driver.execute_script(
        "const td = document.querySelector(`tr[data-revision='${arguments[0]}'] td[data-field='${arguments[1]}']`);"
        "return td ? td.textContent : null;",
        revision, field,
    )


def predict(mesh, count):
    """Sends `count` digits requests through Envoy; how many each revision answered."""
    answered = {}
    for _ in range(count):
        status, headers, _ = http("POST", f"{mesh.url}/v1/models/digits:predict", DIGITS_REQUEST,
                                  {"content-type": "application/json"})
        assert status == 200
        revision = {k.lower(): v for k, v in headers.items()}["x-meshserve-revision"]
        answered[revision] = answered.get(revision, 0) + 1
    return answered


def test_the_console_in_a_browser(mesh, browser):
    browser.get(mesh.console + "/")
    # The revisions, their states and the configured split.
    wait(browser, "the digits revisions", lambda d: cell(d, "digits-predictor-v2", "percent") == "20%")
    assert cell(browser, "digits-predictor-v1", "percent") == "80%"
    assert cell(browser, "digits-predictor-v1", "state") == "warm"
    assert cell(browser, "mnist-predictor-v1", "percent") == "100%"
    assert browser.find_element(By.ID, "envoy").text == mesh.url

    # The split moved to 50% through the page: the same change `meshserve canary` makes.
    percent = browser.find_element(By.ID, "percent-digits")
    percent.clear()
    percent.send_keys("50")
    browser.find_element(By.ID, "set-digits").click()
    wait(browser, "the change applied", lambda d: "Applied" in d.find_element(By.ID, "status-digits").text)
    config = json.loads((mesh.state / "filter.json").read_text())
    digits = next(s for s in config["services"] if s["name"] == "digits")
    assert digits["predictor"]["canaries"][0]["percent"] == 50
    wait(browser, "the configured 50%", lambda d: cell(d, "digits-predictor-v2", "percent") == "50%")
    # Envoy routes accordingly: 200 requests, about half to the canary (binomial, p = 0.5:
    # 35%..65% is over four standard deviations either side).
    answered = predict(mesh, 200)
    assert 70 <= answered.get("digits-predictor-v2", 0) <= 130, answered
    # ... and the page shows the split it observed, from Envoy's counters.
    def observed(d):
        text = cell(d, "digits-predictor-v2", "observed").rstrip("%")
        return text not in ("–", "") and 30 <= float(text) <= 70
    wait(browser, "the observed split near 50%", observed)
    assert float(cell(browser, "digits-predictor-v1", "rate")) > 0
    # Envoy's latency to each revision and the sidecar's model time are read too.
    for revision in ["digits-predictor-v1", "digits-predictor-v2"]:
        wait(browser, f"{revision}'s latency and model time",
             lambda d: cell(d, revision, "latency") != "–" and cell(d, revision, "model") != "–")
        assert cell(browser, revision, "errors") == "0"

    # The payload-log events of those requests, newest first.
    first = wait(browser, "payload-log events", lambda d: d.execute_script(
        "const tr = document.querySelector('#events tr'); return tr ? tr.textContent : null;"))
    assert "digits" in first

    # Try it: the demo's photo, pre-processed in the page by the wasm package, sent through
    # Envoy as a tensor; the CNN reads a 7, and the occlusion explainer's heat map comes back.
    Select(browser.find_element(By.ID, "try-service")).select_by_value("mnist")
    browser.find_element(By.ID, "try-file").send_keys(str(PHOTO))
    browser.find_element(By.ID, "try-run").click()
    wait(browser, "the answer", lambda d: d.find_element(By.ID, "try-top").text == "7", timeout=60)
    assert "[1,1,28,28]" in browser.find_element(By.ID, "try-input-caption").text
    assert "mnist-predictor-v1" in browser.find_element(By.ID, "try-revision").text
    wait(browser, "the heat map", lambda d: "Occlusion" in d.find_element(By.ID, "try-heatmap-caption").text, 60)
    # The 28x28 input was drawn: the canvas holds more than one shade.
    shades = browser.execute_script(
        "const c = document.getElementById('try-input');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return new Set(Array.from(d).filter((_, i) => i % 4 === 0)).size;"
    )
    assert shades > 10, shades
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    print(f"screenshot: {SCREENSHOT}")
    # No script error and no Content-Security-Policy violation on the page (a failed fetch
    # is logged too, as "network": the page reports those itself).
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
    assert errors == [], errors


def test_the_console_takes_no_orders_from_other_sites(mesh):
    change = json.dumps({"isvc": "digits", "action": "percent", "percent": 0}).encode()
    json_type = {"content-type": "application/json"}
    # A page elsewhere cannot add the console's header without a CORS preflight, which the
    # console never grants; nor pass for it (its Origin), nor reach it by another name.
    status, _, body = http("POST", mesh.console + "/api/canary", change, json_type)
    assert status == 403 and b"x-meshserve-console" in body
    status, _, _ = http("POST", mesh.console + "/api/canary", change,
                        {**json_type, "x-meshserve-console": "1", "origin": "http://evil.example"})
    assert status == 403
    status, headers, _ = http("OPTIONS", mesh.console + "/api/canary", None, {
        "origin": "http://evil.example", "access-control-request-method": "POST",
        "access-control-request-headers": "x-meshserve-console"})
    assert status in (403, 405)
    assert not [h for h in headers if h.lower().startswith("access-control-")], headers
    status, _, _ = http("GET", mesh.console + "/api/mesh", None, {"host": "rebound.example:80"})
    assert status == 421
    config = json.loads((mesh.state / "filter.json").read_text())
    digits = next(s for s in config["services"] if s["name"] == "digits")
    assert digits["predictor"]["canaries"][0]["percent"] != 0
    # A bad change is refused with the reason, in the protocol's error shape.
    status, _, body = http("POST", mesh.console + "/api/canary",
                           json.dumps({"isvc": "digits", "action": "percent", "percent": 101}).encode(),
                           {**json_type, "x-meshserve-console": "1"})
    assert status == 400 and "between 0 and 100" in json.loads(body)["error"]
    # Envoy's public listener serves inference only: neither the console nor the sidecars'
    # recent payload events are reachable there.
    for path in ["/api/mesh", "/api/events", "/", "/meshserve/events/recent", "/pkg/meshserve_web.js"]:
        status, _, _ = http("GET", mesh.url + path)
        assert status == 404, path
    # "try it" sends inference on, nothing else.
    status, _, _ = http("POST", mesh.console + "/api/infer/v2/repository/index", b"{}",
                        {**json_type, "x-meshserve-console": "1"})
    assert status == 404
