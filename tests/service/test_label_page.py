"""The labeling page in headless Chromium: an annotator signs in, ranks two items (clicks and keys), and the
labels show up in /ratings.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and ``playwright`` from PyPI in the venv;
``playwright install`` cannot download browsers here, so the test drives the system binary. It skips only when
one of the two is missing, and says which; under CI=true it fails instead (tests/conftest.require_or_skip).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import LiveServer, require_or_skip
from tests.service.helpers import jsonl, upload_dataset

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CANDIDATES = [
    {"prompt": "Name a colour.", "responses": ["Red.", "A chair.", "Blue, like the sky on a clear day."]},
    {
        "prompt": [{"role": "user", "content": "Say hi."}],
        "responses": ["Hello there, nice to meet you!", "Go away."],
    },
    {"prompt": "2+2?", "responses": ["4", "It is 4."]},
]


def _requirements() -> str | None:
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (.venv/bin/pip install playwright)"
    return None


def test_rank_two_items_in_the_browser(live_server: LiveServer, tmp_path: Path) -> None:
    missing = _requirements()
    if missing:
        require_or_skip(missing)
    from playwright.sync_api import expect, sync_playwright

    with live_server.client() as client:
        dataset = upload_dataset(client, jsonl(CANDIDATES), "candidates").json()["id"]
        guidelines = '# Rank by\n- **helpfulness** first\n<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
        fbs = client.post(
            "/v1/feedback-sets",
            json={"name": "browser round", "candidates": dataset, "guidelines": guidelines},
        ).json()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors: list[str] = []  # the page runs under a CSP without inline script or style
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{live_server.base_url}/label/{fbs['id']}")
            page.fill("#annotator", "ada")
            page.fill("#apikey", live_server.api_key)
            page.click("[data-testid=start]")

            # item 1: rank by clicking, longest answer first (the last one is implied)
            expect(page.get_by_test_id("response").first).to_be_visible()
            expect(page.get_by_test_id("progress")).to_contain_text("0 of 3 items complete")
            # the set's guidelines, as text: Markdown structure kept, the markup in them never run or parsed
            shown = page.get_by_test_id("guidelines")
            expect(shown).to_be_visible()
            expect(shown.locator("h3")).to_have_text("Rank by")
            expect(shown.locator("li")).to_have_text("helpfulness first")
            expect(shown).to_contain_text('<img src=x onerror="window.pwned=1"><script>')
            assert shown.locator("img, script").count() == 0
            assert page.evaluate("window.pwned === undefined")
            cards = page.get_by_test_id("response")
            texts = [cards.nth(i).inner_text() for i in range(cards.count())]
            first_prompt = page.get_by_test_id("prompt").inner_text()
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
            for i in order[:-1]:
                cards.nth(i).click()
            expect(page.get_by_test_id("submit")).to_be_enabled()
            page.screenshot(path=str(tmp_path / "ranked.png"), full_page=True)
            page.get_by_test_id("submit").click()

            # item 2: rank with the number keys, submit with Enter
            expect(page.get_by_test_id("prompt")).not_to_have_text(first_prompt)
            expect(page.get_by_test_id("progress")).to_contain_text("You: 1 labelled")
            cards = page.get_by_test_id("response")
            texts = [cards.nth(i).inner_text() for i in range(cards.count())]
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
            for i in order:
                if "ranked" not in (cards.nth(i).get_attribute("class") or ""):
                    page.keyboard.press(str(i + 1))
            page.keyboard.press("Enter")
            expect(page.get_by_test_id("progress")).to_contain_text("You: 2 labelled")

            # item 3: skipped; then nothing is left for ada
            page.get_by_test_id("skip").click()
            expect(page.get_by_test_id("done")).to_be_visible()
            expect(page.get_by_test_id("progress")).to_contain_text("2 of 3 items complete")
            page.screenshot(path=str(tmp_path / "done.png"), full_page=True)
            assert page.get_by_test_id("error").inner_text() == ""
            assert errors == [], errors
        finally:
            browser.close()
    assert (tmp_path / "ranked.png").stat().st_size > 10_000

    with live_server.client() as client:
        ratings = client.get(f"/v1/feedback-sets/{fbs['id']}/ratings").json()
    assert ratings["progress"]["labels"] == 2 and ratings["progress"]["skips"] == 1
    labelled = [item for item in ratings["items"] if item["num_labels"] == 1]
    assert len(labelled) == 2
    for item in labelled:
        best = next(r for r in item["responses"] if r["id"] == item["order"][0])
        assert best["elo"] > 1000 and best["bradley_terry"] > 0
