#!/usr/bin/env python3
"""Opens the aggregator's dashboard in headless Chromium (Debian's, through
chromedriver and Selenium), signs in as one advertiser, waits for the chart,
and prints what the chart shows as JSON: its window and every point (ad,
minute, clicks, final) and each ad's users this hour. Saves a screenshot."""
import argparse
import json
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--advertiser", required=True)
p.add_argument("--token", required=True)
p.add_argument("--screenshot", required=True)
args = p.parse_args()

opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--window-size=1200,1100"]:
    opts.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.set_page_load_timeout(20)
    driver.get(args.url)
    driver.find_element(By.ID, "adv").send_keys(args.advertiser)
    driver.find_element(By.ID, "token").send_keys(args.token)
    driver.find_element(By.CSS_SELECTOR, "#signin button").click()
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart circle.point"))
    # One more refresh (every 2 s), so the chart is a live one, not the first.
    first = driver.find_element(By.ID, "updated").text
    wait.until(lambda d: d.find_element(By.ID, "updated").text != first)
    # Read in one script: the page redraws every 2 s, so element handles
    # taken one by one could outlive their elements.
    out = driver.execute_script("""
        const chart = document.getElementById("chart");
        return {
            start_ms: Number(chart.dataset.start),
            end_ms: Number(chart.dataset.end),
            clicks_card: document.getElementById("t-clicks").textContent,
            error: document.getElementById("error").textContent,
            users: Object.fromEntries([...document.querySelectorAll("#ads tbody tr")]
                .map((tr) => [tr.cells[0].textContent, tr.cells[5].textContent])),
            points: [...chart.querySelectorAll("circle.point")].map((c) => ({
                ad: c.dataset.ad,
                minute: c.dataset.minute,
                clicks: Number(c.dataset.clicks),
                final: c.dataset.final === "true",
            })),
        };
    """)
    driver.save_screenshot(args.screenshot)
    print(json.dumps(out))
finally:
    driver.quit()
