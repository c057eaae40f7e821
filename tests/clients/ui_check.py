#!/usr/bin/env python3
"""Drives Waymark's web views in headless Chromium (Debian `chromium` and `chromium-driver`)
through selenium, one command per line on stdin, one answer per line on stdout.

The end-to-end test (tests/tests/ui.rs) owns the story: it changes the registry through the
real HTTP API and asks the browser what the page shows, so every wait here is on the page's
own DOM, bounded by --timeout. The page is loaded once: each command first checks that it
was not reloaded. Any error in the browser's console (a blocked request, a script error, a
violation of the page's Content-Security-Policy) fails the command that follows it.

Commands (answers start with `ok` or `error`):

  open URL                      load the page; wait until its event stream is live
  load URL                      load the page; wait until it has tried its data (live or not)
  wait-service NAME GLANCE H/T  wait for the service card, its glance and "H/T healthy"
  wait-gone NAME                wait until the service card is gone
  wait-instance ID ATTR VALUE   wait for the instance row's data-ATTR to be VALUE
  check-output ID CHECK TEXT    wait for the check's line to contain TEXT
  token VALUE                   give the page the API token (kept in sessionStorage)
  maintenance ID REASON...      Maintenance, type the reason, Enable
  maintenance-off ID            End maintenance
  deregister ID                 Deregister, then confirm
  notice                        the page's notice line
  wait-notice TEXT              wait for the notice line to contain TEXT
  wait-count ATTR MIN SELECTOR  wait until the element's data-ATTR is a number >= MIN
                                (the gateway view's rows carry data-requests, data-errors)
  text SELECTOR                 the text of the first element matching the CSS selector
                                (whitespace collapsed)
  screenshot PATH               save a PNG of the page
  quit
"""

import argparse
import json
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


class Failed(Exception):
    pass


def css_str(s):
    return json.dumps(s)


class Page:
    def __init__(self, args):
        opts = webdriver.ChromeOptions()
        opts.binary_location = args.chromium
        for flag in (
            "--headless=new",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            # Every name but loopback's resolves to nothing: the page can reach only the
            # listener it came from, so anything else it tried would fail, and show.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        ):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=args.chromedriver), options=opts)
        self.timeout = args.timeout
        self.loaded = False

    # --- plumbing --------------------------------------------------------------------

    def console_errors(self):
        errors = []
        for entry in self.driver.get_log("browser"):
            message = entry.get("message", "")
            # An HTTP answer of the listener itself (a 403 the test provokes) is logged as
            # an error too: that one is the page's to handle, and the test checks it does.
            if entry.get("level") == "SEVERE" and "the server responded with a status of" not in message:
                errors.append(message)
        return errors

    def checked(self):
        """Fails on console errors, and when the page was reloaded since `open`."""
        errors = self.console_errors()
        if errors:
            raise Failed("browser console: " + " | ".join(errors))
        if self.loaded and self.driver.execute_script("return window.__waymarkCheck !== 42;"):
            raise Failed("the page was reloaded")

    def wait(self, what, cond):
        start = time.monotonic()
        last = [None]

        def probe(driver):
            try:
                got = cond(driver)
            except StaleElementReferenceException:
                return False  # re-rendered under us: look again
            last[0] = got
            return got

        try:
            WebDriverWait(self.driver, self.timeout, poll_frequency=0.02).until(probe)
        except TimeoutException:
            raise Failed(f"{what}: not within {self.timeout}s (last: {last[0]!r})")
        self.checked()
        return int((time.monotonic() - start) * 1000)

    def find(self, selector):
        found = self.driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found else None

    def click(self, selector, what):
        self.wait(what, lambda d: self.find(selector) is not None and self.find(selector).is_enabled())
        self.find(selector).click()

    def row(self, instance):
        return f"tr[data-instance={css_str(instance)}]"

    # --- commands --------------------------------------------------------------------

    def open(self, url):
        self.driver.get(url)
        self.driver.execute_script("window.__waymarkCheck = 42;")
        self.loaded = True
        ms = self.wait("the page's event stream live", lambda d: self.find('#live[data-state="live"]') is not None)
        return f"{ms}ms"

    def load(self, url):
        self.driver.get(url)
        self.driver.execute_script("window.__waymarkCheck = 42;")
        self.loaded = True

        def tried(d):
            live = self.find("#live")
            return live is not None and live.get_attribute("data-state") != "connecting"

        ms = self.wait("the page's first fetch", tried)
        return f"{ms}ms: {self.find('#live').text}"

    def wait_service(self, name, glance, count):
        healthy, total = count.split("/")
        sel = f"details[data-service={css_str(name)}]"

        def cond(d):
            card = self.find(sel)
            if card is None:
                return None
            state = (card.get_attribute("data-glance"), card.get_attribute("data-healthy"), card.get_attribute("data-total"))
            text = card.find_element(By.CSS_SELECTOR, "summary .count").text
            return state == (glance, healthy, total) and text == f"{healthy}/{total} healthy"

        ms = self.wait(f"service {name} {glance} {count}", cond)
        return f"{ms}ms"

    def wait_gone(self, name):
        ms = self.wait(f"service {name} gone", lambda d: self.find(f"details[data-service={css_str(name)}]") is None)
        return f"{ms}ms"

    def wait_instance(self, instance, attr, value):
        def cond(d):
            row = self.find(self.row(instance))
            return row is not None and row.get_attribute("data-" + attr) == value

        ms = self.wait(f"instance {instance} data-{attr}={value}", cond)
        return f"{ms}ms"

    def check_output(self, instance, check, text):
        sel = f"{self.row(instance)} li[data-check={css_str(check)}]"

        def cond(d):
            li = self.find(sel)
            return li is not None and text in li.get_attribute("textContent")

        ms = self.wait(f"check {check} of {instance} says {text!r}", cond)
        return f"{ms}ms"

    def token(self, value):
        field = self.find("#token")
        field.clear()
        field.send_keys(value)
        self.find("#token-save").click()
        self.wait("the token kept", lambda d: d.execute_script("return sessionStorage.getItem('waymark-token');") == value)
        return ""

    def maintenance(self, instance, reason):
        self.click(f'{self.row(instance)} button[data-action="maintenance-on"]', "the Maintenance button")
        self.wait("the reason field", lambda d: self.find(f'{self.row(instance)} input[data-action="maintenance-reason"]') is not None)
        field = self.find(f'{self.row(instance)} input[data-action="maintenance-reason"]')
        field.send_keys(reason)
        self.find(f'{self.row(instance)} button[data-action="maintenance-enable"]').click()
        return ""

    def maintenance_off(self, instance):
        self.click(f'{self.row(instance)} button[data-action="maintenance-off"]', "the End maintenance button")
        return ""

    def deregister(self, instance):
        sel = f'{self.row(instance)} button[data-action="deregister"]'
        self.click(sel, "the Deregister button")
        self.wait("the Deregister button armed", lambda d: "armed" in (self.find(sel).get_attribute("class") or ""))
        self.find(sel).click()
        return ""

    def notice(self):
        n = self.find("#notice")
        return n.text if n is not None and n.is_displayed() else ""

    def wait_notice(self, text):
        ms = self.wait(f"the notice says {text!r}", lambda d: text in self.notice())
        return f"{ms}ms: {self.notice()}"

    def wait_count(self, selector, attr, minimum, what):
        def cond(d):
            el = self.find(selector)
            return el is not None and int(el.get_attribute(attr) or "0") >= minimum

        ms = self.wait(what, cond)
        return f"{ms}ms: {self.find(selector).get_attribute(attr)}"

    def text(self, selector):
        el = self.find(selector)
        if el is None:
            raise Failed(f"nothing matches {selector}")
        # innerText: as shown, with line breaks; textContent inside a closed card.
        text = el.text or el.get_attribute("textContent")
        return " ".join(text.split())

    def screenshot(self, path):
        if not self.driver.save_screenshot(path):
            raise Failed(f"could not save a screenshot to {path}")
        return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds each wait may take")
    args = ap.parse_args()
    page = Page(args)
    print("ok ready", flush=True)
    try:
        for line in sys.stdin:
            parts = line.strip().split(" ")
            cmd, rest = parts[0], parts[1:]
            if not cmd:
                continue
            if cmd == "quit":
                print("ok bye", flush=True)
                break
            try:
                if cmd == "open":
                    out = page.open(rest[0])
                elif cmd == "load":
                    out = page.load(rest[0])
                elif cmd == "wait-service":
                    out = page.wait_service(rest[0], rest[1], rest[2])
                elif cmd == "wait-gone":
                    out = page.wait_gone(rest[0])
                elif cmd == "wait-instance":
                    out = page.wait_instance(rest[0], rest[1], rest[2])
                elif cmd == "check-output":
                    out = page.check_output(rest[0], rest[1], " ".join(rest[2:]))
                elif cmd == "token":
                    out = page.token(rest[0])
                elif cmd == "maintenance":
                    out = page.maintenance(rest[0], " ".join(rest[1:]))
                elif cmd == "maintenance-off":
                    out = page.maintenance_off(rest[0])
                elif cmd == "deregister":
                    out = page.deregister(rest[0])
                elif cmd == "notice":
                    out = page.notice()
                elif cmd == "wait-notice":
                    out = page.wait_notice(" ".join(rest))
                elif cmd == "wait-count":
                    attr, minimum, sel = rest[0], int(rest[1]), " ".join(rest[2:])
                    out = page.wait_count(sel, "data-" + attr, minimum, f"{sel} data-{attr} >= {minimum}")
                elif cmd == "text":
                    out = page.text(" ".join(rest))
                elif cmd == "screenshot":
                    out = page.screenshot(rest[0])
                else:
                    raise Failed(f"unknown command {cmd!r}")
                print(f"ok {out}".rstrip(), flush=True)
            except (Failed, IndexError, ValueError, WebDriverException) as e:
                print(f"error {cmd}: {e}".splitlines()[0], flush=True)
    finally:
        page.driver.quit()


if __name__ == "__main__":
    main()
