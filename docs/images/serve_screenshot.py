"""The screenshot in docs/serve.md: three finished images and a fourth at step 2 of 40.

    python docs/images/serve_screenshot.py   (needs the [serve] extra, playwright and /usr/bin/chromium)
"""
import sys, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from serve_helpers import live_server
from tiny_imagegen.serve.app import Config
from playwright.sync_api import sync_playwright

with live_server(Config(output=Path(tempfile.mkdtemp()), memory_budget=1 << 30)) as (url, app), sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
    page = b.new_page(viewport={"width": 1000, "height": 900})
    page.goto(url + "/")
    page.wait_for_selector("#model option[value='tiny-shapes']", state="attached")
    for prompt, seed in (("a red circle", "0"), ("a green triangle", "1"), ("a blue square", "2")):
        page.fill("#prompt", prompt); page.fill("#seed", seed); page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=120000)
    page.fill("#prompt", "a yellow circle"); page.fill("#seed", "4"); page.fill("#steps", "40"); page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('step 2')", timeout=120000)
    page.screenshot(path=str(Path(__file__).with_name("serve-page.png")))
    page.click("#cancel")
    b.close()
