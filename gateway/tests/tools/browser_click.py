#!/usr/bin/env python3
"""A real browser clicking a signed ad link (headless Chromium from Debian,
driven through chromedriver by Selenium from PyPI).

Serves a publisher page holding the ad link and the advertiser's landing page
on --port, opens the publisher page, clicks the ad, waits to land, prints the
final URL and the landing page's heading as JSON, and saves a screenshot.
"""
import argparse
import html
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--ad-url", required=True)
p.add_argument("--screenshot", required=True)
args = p.parse_args()

PUBLISHER = f"""<!doctype html><html><head><title>Publisher</title></head><body>
<h1>Today's news</h1><p>Some article text.</p>
<a id="ad" href="{html.escape(args.ad_url)}"><div style="width:300px;height:100px;background:#fc0">Shop now: item 7</div></a>
</body></html>"""
LANDING = """<!doctype html><html><head><title>Shop</title></head><body>
<h1 id="landed">Item 7 at the advertiser's shop</h1></body></html>"""


class Pages(BaseHTTPRequestHandler):
    def do_GET(self):
        body = PUBLISHER if self.path.startswith("/publisher") else LANDING
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer(("127.0.0.1", args.port), Pages)
threading.Thread(target=server.serve_forever, daemon=True).start()

opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--window-size=800,600",
             # The test gateway's certificate is self-signed.
             "--ignore-certificate-errors"]:
    opts.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.set_page_load_timeout(20)
    driver.get(f"http://127.0.0.1:{args.port}/publisher")
    driver.find_element(By.ID, "ad").click()
    WebDriverWait(driver, 20).until(ec.presence_of_element_located((By.ID, "landed")))
    driver.save_screenshot(args.screenshot)
    print(json.dumps({"url": driver.current_url,
                      "heading": driver.find_element(By.ID, "landed").text}))
finally:
    driver.quit()
    server.shutdown()
