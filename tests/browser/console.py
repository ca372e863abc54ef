"""The operator console in a real browser: Debian's Chromium, driven by
Selenium through chromedriver. Run by `tests/all/console.rs`, which starts
the Klaviyo sandbox and `cdp-host serve` with two shops and answers the
one request this script makes of it on stdin ("heal": the sandbox stops
refusing the poisoned event, so that its replay can be delivered).

Usage: console.py CONSOLE_URL ADMIN_TOKEN SCREENSHOT_DIR V2_VERSION V2_SHA256 IMPOSTOR_SHA256
Prints "ok" last when every check passed; fails loudly otherwise.
"""
import base64
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.support.ui import WebDriverWait

url, token, shots, v2, v2_sha, impostor_sha = sys.argv[1:7]
os.makedirs(shots, exist_ok=True)
run = uuid.uuid4().hex[:8]


def post_event(write_key, event):
    request = urllib.request.Request(
        url + "/v1/track",
        data=json.dumps(event).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode((write_key + ":").encode()).decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200, answer.status


def track(n, shop, **extra):
    event = {
        "type": "track",
        "event": "Order Completed",
        "messageId": f"{shop}-{run}-{n}",
        "userId": f"user-{shop}-{n}",
        "properties": {"email": f"buyer{n}@example.org", "total": 42, "order_id": f"o-{n}"},
    }
    event.update(extra)
    return event


def wait(what, check, seconds=20):
    deadline = time.time() + seconds
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the page may be changing under us
            last = e
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def submit(button):
    """Clicks a button that sends its form, and waits for the answer's
    page: going elsewhere before it came would cancel the request."""
    button.click()
    WebDriverWait(driver, 30).until(lambda _: left_behind(button))


def left_behind(element):
    """Whether the page holding `element` has been replaced. Chrome may
    answer for a node of the old page with an inspector error ("does not
    belong to the document") rather than as stale: gone either way."""
    try:
        element.is_enabled()
        return False
    except WebDriverException:
        return True


def shot(name):
    driver.save_screenshot(os.path.join(shots, name + ".png"))


def cell(shop, field):
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-connection="{shop}"]')
    return row.find_element(By.CSS_SELECTOR, f'[data-live="{field}"]').text


def no_xss():
    assert driver.execute_script("return window.__xss === undefined"), "an event's script ran"


options = Options()
options.binary_location = "/usr/bin/chromium"
for flag in [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1500,1000",
]:
    options.add_argument(flag)
profile = tempfile.mkdtemp(prefix="cdp-console-chromium-")
options.add_argument("--user-data-dir=" + profile)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
driver.set_page_load_timeout(30)
try:
    # Not signed in: the login page. A wrong token is refused in words.
    driver.get(url + "/console/")
    assert driver.current_url.endswith("/console/login"), driver.current_url
    driver.find_element(By.ID, "token").send_keys("not-the-token")
    submit(driver.find_element(By.ID, "sign-in"))
    assert "not the admin token" in driver.page_source
    shot("login")
    driver.find_element(By.ID, "token").send_keys(token)
    submit(driver.find_element(By.ID, "sign-in"))
    wait("the overview", lambda: driver.find_elements(By.ID, "connections"))
    cookie = driver.get_cookie("cdp_console")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
    assert not driver.execute_script("return document.cookie").count("cdp_console"), "the session is readable by script"

    # Two shops' live counts move as events are posted, without a reload.
    before = {shop: int(cell(shop, "delivered")) for shop in ["shop-a", "shop-b"]}
    for n in range(5):
        post_event("wk_a", track(n, "a"))
        post_event("wk_b", track(n, "b"))
    post_event("wk_a", track(99, "a"))
    wait("shop-a's count to move", lambda: int(cell("shop-a", "delivered")) >= before["shop-a"] + 6)
    wait("shop-b's count to move", lambda: int(cell("shop-b", "delivered")) >= before["shop-b"] + 5)
    assert driver.find_elements(By.CSS_SELECTOR, 'tr[data-connection="shop-a"] svg.chart polyline')
    shot("overview")

    # An event whose properties hold markup; none of it may run.
    xss = track(
        7, "a",
        messageId=f"find-me-{run}",
        properties={
            "email": "xss@example.org",
            "note": "<script>window.__xss = 1</script>",
            "title": '"><img src=x onerror="window.__xss = 2">',
            "total": 42,
        },
    )
    xss["event"] = '<img src=x onerror="window.__xss = 3">'
    post_event("wk_a", xss)

    # Find it by messageId on its connection's page: its request with the
    # key masked, and Klaviyo's answer.
    driver.get(url + "/console/connections/shop-a")
    search = driver.find_element(By.NAME, "q")
    search.send_keys(f"find-me-{run}")
    submit(driver.find_element(By.CSS_SELECTOR, "#search button"))
    row = wait(
        "the event found by messageId",
        lambda: driver.find_element(By.CSS_SELECTOR, f'tr[data-message-id="find-me-{run}"]'),
    )
    assert len(driver.find_elements(By.CSS_SELECTOR, "#events tbody tr")) == 1, "the search shows only that event"
    row.find_element(By.TAG_NAME, "summary").click()
    request = row.find_element(By.CSS_SELECTOR, "pre.request").text
    assert "authorization: Klaviyo-API-Key ***" in request, request
    assert "pk_shop_a" not in driver.page_source, "the key reached the page"
    assert "<script>window.__xss = 1</script>" in row.find_element(By.CSS_SELECTOR, "pre.event-body").text
    assert "Answer: HTTP 202" in row.text, row.text
    assert not driver.find_elements(By.CSS_SELECTOR, "#events img, #events script"), "event markup became elements"
    no_xss()
    shot("connection-search")

    # By person, and the live tail: a new event appears without a reload.
    driver.get(url + "/console/connections/shop-a")
    wait("the recent events", lambda: driver.find_elements(By.CSS_SELECTOR, "#events tbody tr"))
    post_event("wk_a", track(11, "a", messageId=f"tail-{run}"))
    wait("the live tail", lambda: driver.find_elements(By.CSS_SELECTOR, f'tr[data-message-id="tail-{run}"]'))
    no_xss()
    driver.get(url + "/console/connections/shop-a?q=user-a-11")
    assert driver.find_elements(By.CSS_SELECTOR, f'tr[data-message-id="tail-{run}"]'), "search by userId"

    # A dead letter: refused by Klaviyo, listed with its reason; replayed
    # once Klaviyo takes it, and then delivered.
    poisoned = track(3, "b", messageId=f"dead-{run}")
    poisoned["properties"]["note"] = "poison-me"
    post_event("wk_b", poisoned)

    def letter_listed():
        driver.get(url + "/console/dead-letters?connection=shop-b")
        rows = [r for r in driver.find_elements(By.CSS_SELECTOR, "#letters tr[data-letter]") if f"dead-{run}" in r.text]
        return rows[0] if rows else None

    letter = wait("the dead letter", letter_listed)
    assert "HTTP 400" in letter.text, letter.text
    no_xss()
    shot("dead-letters")
    print("heal", flush=True)
    assert sys.stdin.readline().strip() == "healed"
    letter = letter_listed()
    # Unconfirmed, the browser does not send it (the box is required);
    # ticked, it goes.
    letter.find_element(By.CSS_SELECTOR, "form[action$='/replay'] input[name=confirm]").click()
    submit(letter.find_element(By.CSS_SELECTOR, "button.replay"))
    wait("the letter gone", lambda: not letter_listed())

    def delivered_after_replay():
        driver.get(url + f"/console/connections/shop-b?q=dead-{run}&outcome=delivered")
        return driver.find_elements(By.CSS_SELECTOR, f'tr[data-message-id="dead-{run}"]')

    wait("the replayed event delivered", delivered_after_replay)

    # Plugins: a canary of v2 on shop-a, then its rollback; shop-b stays.
    # The impostor's canary refuses it, in words, and shop-b keeps serving.
    def put_on(shop, sha):
        driver.get(url + "/console/plugins")
        row = driver.find_element(By.CSS_SELECTOR, f'#serving tr[data-connection="{shop}"]')
        row.find_element(By.CSS_SELECTOR, f'option[value="{sha}"]').click()
        submit(row.find_element(By.CSS_SELECTOR, "button.swap"))

    serving = lambda shop: driver.find_element(By.CSS_SELECTOR, f'#serving tr[data-connection="{shop}"] td.serving').text
    driver.get(url + "/console/plugins")
    assert v2_sha in driver.find_element(By.ID, "versions").text
    put_on("shop-a", v2_sha)
    wait("shop-a on v2", lambda: serving("shop-a").startswith(v2))
    assert not serving("shop-b").startswith(v2), "only shop-a was swapped"
    shot("plugins")
    put_on("shop-b", impostor_sha)
    refusal = wait("the canary's refusal", lambda: driver.find_element(By.ID, "refusal").text)
    assert "canary" in refusal or "trap" in refusal, refusal
    shot("plugin-refused")
    driver.get(url + "/console/plugins")
    assert impostor_sha[:12] not in serving("shop-b"), "the refused version serves"
    submit(driver.find_element(By.CSS_SELECTOR, '#serving tr[data-connection="shop-a"] button.rollback'))
    wait("shop-a rolled back", lambda: not serving("shop-a").startswith(v2))

    # A change without the session's CSRF token is refused; a request
    # without a session goes to the login page.
    session = "cdp_console=" + cookie["value"]
    forged = urllib.request.Request(
        url + "/console/dead-letters/purge", data=b"confirm=yes", headers={"Cookie": session}
    )
    try:
        urllib.request.urlopen(forged, timeout=10)
        raise AssertionError("a change without a CSRF token went through")
    except urllib.error.HTTPError as e:
        assert e.code == 403, e.code
    anonymous = urllib.request.urlopen(url + "/console/live.json", timeout=10)
    assert anonymous.geturl().endswith("/console/login"), anonymous.geturl()

    # Signing out ends the session.
    driver.get(url + "/console/")
    submit(driver.find_element(By.CSS_SELECTOR, "form[action='/console/logout'] button"))
    wait("the login page", lambda: driver.current_url.endswith("/console/login"))
    driver.get(url + "/console/")
    assert driver.current_url.endswith("/console/login")
    no_xss()
    print("ok", flush=True)
finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
