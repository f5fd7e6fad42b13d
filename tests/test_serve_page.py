"""The page of `tiny-imagegen serve` in a real browser: Debian's Chromium, headless, driven by
Playwright. Type a prompt, generate, see the progress and the image, reuse its parameters, on a
desktop and on a phone-width screen; screenshots are saved as test artifacts (tests/artifacts/).
Skipped only where Chromium or Playwright is absent, never under CI=true (.ci/run installs both)."""

import os
from pathlib import Path

import pytest

from conftest import require_modules
from serve_helpers import live_server, require_serve

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


@pytest.fixture(scope="module")
def browser():
    require_serve()
    require_modules("playwright")
    if not CHROMIUM.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {CHROMIUM} is missing (.ci/run installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_serve()
    from tiny_imagegen.serve.app import Config

    with live_server(Config(output=tmp_path_factory.mktemp("page"), memory_budget=1 << 30)) as (url, app):
        yield url, app


@pytest.mark.parametrize("screen", [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_generate_watch_and_reuse(browser, server, screen):
    url, app = server
    page = browser.new_page(viewport={"width": screen[0], "height": screen[1]})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("#model option[value='tiny-shapes']", state="attached")
    page.fill("#prompt", "a blue square")
    page.fill("#steps", "6")
    statuses = generate_and_watch(page)
    # the live progress: each step was shown, and the preview holds the decoded latents
    assert [f"step {i} / 6" for i in range(1, 7)] == [s.split(" (")[0] for s in statuses if s.startswith("step")], statuses
    assert page.eval_on_selector("#progress", "p => p.value") == 1
    assert page.eval_on_selector("#preview", "img => img.src").startswith("data:image/png;base64,")
    card = page.wait_for_selector(".card:has(dd:text-is('a blue square'))")
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=card.query_selector("img"))
    assert card.query_selector("a.download").get_attribute("download").endswith(".png")
    seed = card.eval_on_selector("dl", "dl => [...dl.children].find(e => e.textContent === 'seed')"
                                       ".nextElementSibling.textContent")
    # reuse: the form gets the image's parameters back, its seed fixed
    page.fill("#prompt", "something else")
    card.query_selector("button.reuse").click()
    assert page.input_value("#prompt") == "a blue square"
    assert page.input_value("#seed") == seed and page.input_value("#steps") == "6"
    assert not page.is_checked("#random-seed")
    # the phone-width layout does not scroll sideways
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"serve-page-{screen[0]}.png"), full_page=True)
    # the same parameters again: the same seed makes the same image
    cards = page.eval_on_selector_all(".card", "cards => cards.length")
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('.card').length > {cards}", timeout=60_000)
    names = [j for j in app.state.worker.jobs.values() if j.state == "done"][-2:]
    assert (app.state.config.output / names[0].images[0]["name"]).read_bytes() == \
        (app.state.config.output / names[1].images[0]["name"]).read_bytes()
    assert not errors, errors
    page.close()


def generate_and_watch(page) -> list[str]:
    """Click Generate and return every status the page showed until 'done', however fast they passed:
    each mutation record's added text node, not the element's text when the observer runs (records
    that arrive in one batch, as fast steps do, would otherwise show only the last status)."""
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(records => records.forEach(r => r.addedNodes.forEach(n => window.seen.push(n.textContent))))
            .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});
    }""")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
    return page.evaluate("window.seen")


def test_edit_an_uploaded_image_with_its_steps(browser, server, tmp_path):
    """An image and a mask chosen on the page: the edit is queued as a job, its steps shown, and its
    image is what `generate --image --mask` writes."""
    import io

    import numpy as np
    from PIL import Image

    from tiny_imagegen.commands.generate import main
    from tiny_imagegen.commands.metadata import read_parameters

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    url, app = server
    picture = Image.fromarray((np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("#model option[value='tiny-shapes']", state="attached")
    page.fill("#prompt", "a green triangle")
    page.fill("#steps", "3")
    page.uncheck("#random-seed")
    page.fill("#seed", "4")
    page.click("#edit summary")
    page.set_input_files("#image", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": png(picture)}])
    page.set_input_files("#mask", files=[{"name": "mask.png", "mimeType": "image/png",
                                          "buffer": png(Image.fromarray(mask, mode="L"))}])
    statuses = generate_and_watch(page)
    assert [f"step {i} / 3" for i in range(1, 4)] == [s.split(" (")[0] for s in statuses if s.startswith("step")], statuses
    page.wait_for_selector(".card:has(dd:text-is('a green triangle'))")
    job = [j for j in app.state.worker.jobs.values() if j.state == "done"][-1]
    served = app.state.config.output / job.images[0]["name"]
    meta = read_parameters(served)
    assert main(["--prompt", "a green triangle", "--image", meta["image"], "--mask", meta["mask"], "--steps", "3",
                 "--seed", "4", "--output", str(tmp_path / "cmd.png")]) == 0
    assert served.read_bytes() == (tmp_path / "cmd.png").read_bytes()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-page-edit.png"), full_page=True)
    assert not errors, errors
    page.close()
