"""The web console (/ui/) in headless Chromium against a real server running real jobs on the tiny model.

One server and one browser for the module (a few seconds each to start); every test opens its own page,
signs in through the form, saves a screenshot under its tmp_path and fails if the page logged a console
error or threw. Elements are found by role and accessible name, as a keyboard or screen-reader user finds
them. Needs Debian's chromium and playwright (tests/service/test_label_page.py says how); skips without them,
fails under CI=true (tests/conftest.require_or_skip).

Set ALIGND_CONSOLE_SCREENSHOT=<path.png> to also save the running job's page there (docs/img/console-job.png
is made that way).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEYS, UvicornThread, make_settings, require_or_skip
from tests.service.helpers import jsonl, upload_dataset, upload_model, wait_for
from tests.service.test_label_page import CHROMIUM, CHROMIUM_ARGS, _requirements

# One worker runs them all under `make test` (--dist loadgroup), so the module's server and browser are made once.
pytestmark = pytest.mark.xdist_group("console")

TERMINAL = {"succeeded", "failed", "cancelled"}
KEY = API_KEYS["tenant-a"]
THINGS = ("apple", "sky", "grass", "snow", "coal", "plum")
GRADERS = [
    {
        "type": "string_check",
        "name": "says_the",
        "input": "{{sample.output_text}}",
        "reference": "The",
        "operation": "like",
    },
    {
        "type": "string_check",
        "name": "names_it",
        "input": "{{sample.output_text}}",
        "reference": "{{item.thing}}",
        "operation": "ilike",
    },
]


def _sft(model: str, dataset: str, name: str, **hyper: Any) -> dict[str, Any]:
    hyperparameters = {"epochs": 1, "batch_size": 4, "learning_rate": 3e-3, "max_length": 64, **hyper}
    return {
        "method": "sft",
        "base_model": model,
        "datasets": {"sft": dataset},
        "lora": {"r": 4, "alpha": 8},
        "hyperparameters": hyperparameters,
        "seed": 1,
        "name": name,
    }


@dataclass
class World:
    """The module's server, with a model, data and two short SFT runs submitted at start."""

    base_url: str
    model: str
    sft: str
    prompts: str
    runs: dict[str, str]
    evaluation: list[str] = field(default_factory=list)
    long: list[str] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def finished(self, job: str, timeout: float = 240) -> dict[str, Any]:
        with self.client() as client:
            done = wait_for(client, job, TERMINAL, timeout=timeout)
            assert done["status"] == "succeeded", client.get(f"/v1/jobs/{job}/events").json()
            return done

    def long_run(self) -> str:
        """A job that runs until cancelled (1000 epochs): watched, then paused, resumed and cancelled."""
        if not self.long:
            with self.client() as client:
                body = _sft(self.model, self.sft, "long-run", epochs=1000)
                self.long.append(client.post("/v1/jobs", json=body).json()["id"])
        return self.long[0]

    def start_evaluation(self) -> str:
        """An evaluate job of the base and run-a's adapter (started once, by the first test that needs it)."""
        if not self.evaluation:
            self.finished(self.runs["run-a"])
            with self.client() as client:
                artifacts = client.get(f"/v1/jobs/{self.runs['run-a']}/artifacts").json()["data"]
                adapter = next(a["id"] for a in artifacts if a["kind"] == "adapter")
                body = {
                    "method": "evaluate",
                    "name": "eval-a",
                    "base_model": self.model,
                    "datasets": {"prompts": self.prompts},
                    "evaluation": {
                        "candidates": [{"name": "base"}, {"name": "sft", "adapter": adapter}],
                        "baseline": "base",
                        "graders": GRADERS,
                        "sampling": {"max_new_tokens": 8, "temperature": 0},
                        "bootstrap_resamples": 200,
                    },
                    "seed": 0,
                }
                response = client.post("/v1/jobs", json=body)
                assert response.status_code == 202, response.text
                self.evaluation.append(response.json()["id"])
        return self.evaluation[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sft_jsonl: Path) -> Iterator[World]:
    missing = _requirements()
    if missing:
        require_or_skip(missing)
    from alignd_server.embedded import create_app

    # Three jobs at once: the two short runs and the long one the first test watches and cancels.
    settings = make_settings(tmp_path_factory.mktemp("console") / "alignd", worker_concurrency=3)
    with UvicornThread(create_app(settings)) as server:
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as c:
            model = upload_model(c, tiny_model_dir).json()["id"]
            sft = upload_dataset(c, sft_jsonl, "sft").json()["id"]
            rows = [{"prompt": f"What colour is the {thing}?", "thing": thing} for thing in THINGS]
            prompts = upload_dataset(c, jsonl(rows), "prompts").json()["id"]
            runs = {}
            for name, rate in (("run-a", 3e-3), ("run-b", 1e-2)):
                runs[name] = c.post(
                    "/v1/jobs", json=_sft(model, sft, name, learning_rate=rate, max_steps=6)
                ).json()["id"]
        yield World(server.base_url, model, sft, prompts, runs)


@pytest.fixture(scope="module")
def browser(world: World) -> Iterator[Any]:
    from playwright.sync_api import expect, sync_playwright

    # Jobs take seconds to start a training child on two shared cores: wait longer than Playwright's 5 s.
    expect.set_options(timeout=30_000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A fresh browser context and page at 1280x800 that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, world: World, viewport: dict[str, int] | None = None) -> None:
        self.world = world
        self.context = browser.new_context(
            viewport=viewport or {"width": 1280, "height": 800}, accept_downloads=True
        )
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.page.on(
            "console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None
        )
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def sign_in(self, route: str = "") -> None:
        from playwright.sync_api import expect

        self.page.goto(f"{self.world.base_url}/ui/{route}")
        self.page.get_by_label("API key").fill(KEY)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.get_by_role("button", name="Sign out")).to_be_visible()

    def finish(self, screenshot: Path, expected: str | None = None) -> None:
        """Screenshot, close, and no console error but the one ``expected`` (a regex) names, if any."""
        self.page.screenshot(path=str(screenshot), full_page=True)
        assert KEY not in self.page.url
        self.context.close()
        errors = [e for e in self.errors if expected is None or not re.search(expected, e)]
        assert errors == [], errors
        assert screenshot.stat().st_size > 10_000


@pytest.fixture
def page(browser: Any, world: World, tmp_path: Path) -> Iterator[Page]:
    opened = Page(browser, world)
    try:
        yield opened
    finally:
        if not opened.page.is_closed():  # the test failed before finish(): keep what the page showed
            opened.page.screenshot(path=str(tmp_path / "at-failure.png"), full_page=True)
            print("page errors:", opened.errors)
        opened.context.close()


def _points(page: Any, chart: str) -> int:
    """The chart's point count; 0 while the chart is not drawn yet. (The chart appears with the job's first
    point: under load that came more than 30 s after "running", so waiting inside get_attribute, Playwright's
    default 30 s, failed before _wait_points' own timeout did.)"""
    figure = page.locator(f'figure[data-chart="{chart}"]')
    if figure.count() == 0:
        return 0
    return int(figure.get_attribute("data-points", timeout=5_000) or 0)


def _wait_points(page: Any, chart: str, more_than: int, timeout: float = 30) -> int:
    """Polled from here: page.wait_for_function evaluates its string with eval, which the console's CSP
    (rightly) refuses."""
    deadline = time.monotonic() + timeout
    while (points := _points(page, chart)) <= more_than:
        assert time.monotonic() < deadline, f"{chart}: still {points} points after {timeout} s"
        time.sleep(0.2)
    return points


def test_sign_in_and_watch_a_running_job(world: World, page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    p = page.page
    p.goto(f"{world.base_url}/ui")  # the redirect to /ui/, then the sign-in form: auth is on
    expect(p.get_by_role("heading", name="Sign in to alignd")).to_be_visible()
    page.sign_in()
    assert p.evaluate("sessionStorage.getItem('alignd.apiKey')") == KEY
    expect(p.get_by_role("link", name="run-a")).to_be_visible()
    # The list is live: a job submitted now shows up without a reload, and its row moves to running.
    world.long_run()
    row = p.get_by_role("row").filter(has=p.get_by_role("link", name="long-run"))
    expect(row).to_be_visible()
    expect(row.get_by_text("running")).to_be_visible(timeout=120_000)

    # run-a (submitted first) is done by now: its evaluation runs while this test watches the long run.
    world.start_evaluation()
    p.get_by_role("link", name="long-run").click()
    expect(p.get_by_role("heading", name="long-run", level=1)).to_be_visible()
    # Generous: the training child imports torch first, which takes a minute on two cores shared by a full
    # `make test` (load average 8-10 seen).
    expect(p.locator('figure[data-chart="sft · loss"]')).to_be_visible(timeout=120_000)
    seen = _wait_points(p, "sft · loss", 1, timeout=60)
    # More points arrive over the metrics stream while the page stays open.
    _wait_points(p, "sft · loss", seen, timeout=60)
    expect(p.get_by_role("log", name="Events log")).to_contain_text("Job started")
    # The chooser hides a series' chart; smoothing redraws without losing points.
    p.get_by_role("checkbox", name="sft · learning_rate").uncheck()
    expect(p.locator('figure[data-chart="sft · learning_rate"]')).to_have_count(0)
    p.get_by_label("Smoothing").fill("0.6")
    assert _points(p, "sft · loss") >= seen
    if os.environ.get("ALIGND_CONSOLE_SCREENSHOT"):
        p.screenshot(path=os.environ["ALIGND_CONSOLE_SCREENSHOT"])
    page.finish(tmp_path / "running.png")


# What the job's state region showed, every time it changed: "pausing…" lasts from the pause's answer until
# the next poll finds the job paused (a second or so), too short to be sure to catch by polling from here.
RECORD_STATE = """() => {
  const region = document.querySelector('[aria-label="Job state"]');
  window.stateSeen = [region.textContent];
  new MutationObserver(() => window.stateSeen.push(region.textContent))
    .observe(region, { childList: true, subtree: true, characterData: true });
}"""


def test_pause_resume_and_cancel_a_running_job(world: World, page: Page, tmp_path: Path) -> None:
    """The long run (still running after the first test) paused from its page: "pausing…" while the pause is
    pending, then paused with its chart still; resumed with the keyboard, it runs again; then cancelled."""
    from playwright.sync_api import expect

    job_id = world.long_run()
    p = page.page
    page.sign_in(f"#/jobs/{job_id}")
    state = p.get_by_role("region", name="Job state")
    expect(state.get_by_text("running")).to_be_visible(timeout=120_000)
    # A step done first: a pause keeps the steps from the newest checkpoint, and saves one of its own.
    _wait_points(p, "sft · loss", 0, timeout=120)
    p.evaluate(RECORD_STATE)
    with p.expect_response(f"**/v1/jobs/{job_id}/pause") as answer:
        p.get_by_role("button", name="Pause job").click()
    assert answer.value.status == 200 and answer.value.json()["pause_requested"] is True
    expect(state.get_by_text("paused", exact=True)).to_be_visible(timeout=60_000)
    seen = p.evaluate("window.stateSeen")
    assert any("runningpausing…" in text for text in seen), seen
    resume = p.get_by_role("button", name="Resume job")
    expect(resume).to_be_focused()  # the redrawn button kept the keyboard focus
    events = p.get_by_role("log", name="Events log")
    expect(events).to_contain_text("Pause requested")
    expect(events).to_contain_text("Job paused; resume continues from its newest checkpoint.")
    timeline = p.get_by_role("list", name="Stage timeline")
    expect(timeline.locator("li strong")).to_have_text(["queued", "sft", "paused"])
    with world.client() as client:
        paused = client.get(f"/v1/jobs/{job_id}").json()
        assert (paused["status"], paused["pause_requested"]) == ("paused", False)
        stored = len(client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss"}).json()["data"])
    # Paused, the chart holds every point the job wrote, and gains none.
    expect(p.locator('figure[data-chart="sft · loss"]')).to_have_attribute("data-points", str(stored))
    ran_for = state.locator("dl > div").filter(has=p.locator("dt", has_text="Ran for")).locator("dd")
    ran = ran_for.inner_text()
    # A poll (every 1.5 s) redraws the facts at least 1 s after the ones read: a running clock would move.
    time.sleep(2.5)
    assert _points(p, "sft · loss") == stored
    assert ran_for.inner_text() == ran  # its clock stopped at the pause
    p.screenshot(path=str(tmp_path / "paused.png"), full_page=True)
    # The job list's status filter knows paused: the long run alone (run-a and run-b have succeeded).
    p.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    p.get_by_label("Status").select_option("paused")
    jobs = p.get_by_role("table", name="Jobs (paused)")
    expect(jobs.get_by_role("row").filter(has=p.get_by_role("link", name="long-run"))).to_contain_text(
        "paused"
    )
    expect(jobs.get_by_role("link", name="run-a")).to_have_count(0)
    p.go_back()
    p.go_back()

    # Enter on the Resume button resumes: queued, then running again from the checkpoint.
    p.get_by_role("button", name="Resume job").focus()
    with p.expect_response(f"**/v1/jobs/{job_id}/resume") as answer:
        p.keyboard.press("Enter")
    assert answer.value.status == 200
    expect(state.get_by_text("running")).to_be_visible(timeout=60_000)
    expect(events).to_contain_text("Job resumed: queued to continue from its newest checkpoint.")
    expect(timeline.locator("li strong")).to_have_text(["queued", "sft", "paused", "resumed"])
    expect(p.get_by_role("button", name="Pause job")).to_be_visible()
    # The worker's word that it goes on from the pause's checkpoint (test_pause_resume.py checks the steps;
    # the new training process's points come after its torch import, which this test does not wait for).
    expect(events).to_contain_text("Resuming from checkpoint")
    with world.client() as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    p.screenshot(path=str(tmp_path / "resumed.png"), full_page=True)

    p.get_by_role("button", name="Cancel job").click()
    dialog = p.get_by_role("dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Yes, cancel the job").click()
    expect(state.get_by_text("cancelled")).to_be_visible(timeout=60_000)
    expect(p.get_by_role("button", name="Cancel job")).to_have_count(0)
    expect(p.get_by_role("button", name="Pause job")).to_have_count(0)
    with world.client() as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    page.finish(tmp_path / "cancelled.png")


def test_compare_two_runs_and_download_an_artifact(world: World, page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    for job in world.runs.values():
        world.finished(job)
    world.start_evaluation()  # started by the first test, unless it ran alone
    p = page.page
    page.sign_in("#/compare")
    p.get_by_role("checkbox", name="Compare run-a").check()
    p.get_by_role("checkbox", name="Compare run-b").check()
    p.get_by_role("button", name="Compare selected").click()
    expect(p.get_by_label("Metric")).to_have_value("sft · loss")
    overlay = p.locator('figure[data-chart="sft · loss"]')
    expect(overlay).to_be_visible()
    # 6 steps of each run on one chart, one line per run (uPlot's legend names them).
    expect(overlay).to_have_attribute("data-points", "12")
    expect(overlay.locator(".u-legend")).to_contain_text("run-a")
    expect(overlay.locator(".u-legend")).to_contain_text("run-b")
    summary = p.get_by_role("table", name="Summary of sft · loss")
    expect(summary.get_by_role("row")).to_have_count(3)
    p.screenshot(path=str(tmp_path / "compare.png"), full_page=True)

    p.get_by_role("link", name="run-a").first.click()
    expect(p.get_by_role("heading", name="run-a", level=1)).to_be_visible()
    with world.client() as client:
        artifacts = client.get(f"/v1/jobs/{world.runs['run-a']}/artifacts").json()["data"]
    adapter = next(a for a in artifacts if a["kind"] == "adapter")
    with p.expect_download() as download_info:
        p.get_by_role("button", name=f"Download adapter {adapter['id']}").click()
    download = download_info.value
    assert download.suggested_filename == f"{adapter['id']}.tar.gz"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == adapter["sha256"]
    expect(p.get_by_text(f"Saved {adapter['id']}.tar.gz (sha256 verified).")).to_be_visible()
    expect(p.get_by_role("cell", name=adapter["sha256"])).to_be_visible()
    page.finish(tmp_path / "download.png")


def test_open_an_evaluation_and_sort_its_table(world: World, page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    job = world.finished(world.start_evaluation())
    p = page.page
    page.sign_in("#/evals")
    p.get_by_role("link", name="eval-a").click()
    expect(p.get_by_role("heading", name="Evaluation of eval-a")).to_be_visible()
    expect(p.get_by_role("img", name=re.compile("says_the: mean score per candidate"))).to_be_visible()
    expect(p.get_by_role("img", name=re.compile("says_the: win-rate vs base"))).to_be_visible()

    table = p.get_by_role("table", name=re.compile(r"Per prompt \(6 prompts\)"))
    expect(table).to_be_visible()
    focus = table.get_by_role("columnheader", name="sft · says_the")
    expect(focus).to_have_attribute("aria-sort", "ascending")  # worst first by default
    scores = _column(table, "sft · says_the")
    assert scores == sorted(scores)

    number = table.get_by_role("columnheader", name="#")
    number.get_by_role("button").click()
    expect(number).to_have_attribute("aria-sort", "ascending")
    assert _column(table, "#") == [1, 2, 3, 4, 5, 6]
    number.get_by_role("button").click()
    expect(number).to_have_attribute("aria-sort", "descending")
    assert _column(table, "#") == [6, 5, 4, 3, 2, 1]
    # Keyboard: the header buttons are reachable and work with Enter.
    answer_header = table.get_by_role("columnheader", name="sft answer").get_by_role("button")
    answer_header.focus()
    p.keyboard.press("Enter")
    expect(table.get_by_role("columnheader", name="sft answer")).to_have_attribute("aria-sort", "ascending")
    expect(answer_header).to_be_focused()  # the redrawn table gives the focus back
    p.keyboard.press("Enter")
    expect(table.get_by_role("columnheader", name="sft answer")).to_have_attribute("aria-sort", "descending")
    assert job["status"] == "succeeded"
    page.finish(tmp_path / "evaluation.png")


def _column(table: Any, header: str) -> list[float]:
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    index = headers.index(header)
    cells = table.locator(f"tbody tr td:nth-child({index + 1})").all_inner_texts()
    return [float(c) for c in cells]


def test_phone_width_and_keyboard(world: World, browser: Any, tmp_path: Path) -> None:
    """At 390 px the page does not scroll sideways (wide tables scroll inside their own box), and the nav
    is reachable by Tab with a visible focus ring."""
    opened = Page(browser, world, viewport={"width": 390, "height": 844})
    try:
        opened.sign_in("#/jobs")
        p = opened.page
        from playwright.sync_api import expect

        expect(p.get_by_role("link", name="run-a")).to_be_visible()
        assert p.evaluate("document.documentElement.scrollWidth") <= 390
        p.keyboard.press("Tab")
        focused = p.evaluate("document.activeElement.textContent")
        assert focused  # the skip link or the brand: something visible took the focus
        time.sleep(0.1)
        opened.finish(tmp_path / "phone.png")
    finally:
        opened.context.close()


def test_sign_out_then_another_tenant_sees_only_its_own(world: World, page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    p = page.page
    page.sign_in("#/jobs")
    expect(p.get_by_role("link", name="run-a")).to_be_visible()
    p.get_by_role("button", name="Sign out").click()
    expect(p.get_by_role("heading", name="Sign in to alignd")).to_be_visible()
    assert p.evaluate("sessionStorage.getItem('alignd.apiKey')") is None
    p.get_by_label("API key").fill(API_KEYS["tenant-b"])
    p.get_by_role("button", name="Sign in").click()
    expect(p.get_by_role("table", name="Jobs")).to_be_visible()
    expect(p.get_by_role("link", name="run-a")).to_have_count(0)
    expect(p.get_by_text("No jobs yet")).to_be_visible()
    p.get_by_role("navigation", name="Main").get_by_role("link", name="Models").click()
    expect(p.get_by_text("No models yet")).to_be_visible()
    page.finish(tmp_path / "tenant-b.png")


def test_no_key_asked_without_keys(browser: Any, tmp_path: Path) -> None:
    """Embedded single-tenant mode (no ALIGND_API_KEYS, no key in the database): the console opens on the
    job list without asking for a key, and offers no sign-out."""
    from playwright.sync_api import expect

    from alignd_server.embedded import create_app

    settings = make_settings(tmp_path / "alignd", api_keys=None)
    with UvicornThread(create_app(settings)) as server:
        opened = Page(browser, World(server.base_url, "", "", "", {}))
        p = opened.page
        p.goto(f"{server.base_url}/ui/")
        expect(p.get_by_role("heading", name="Jobs", level=1)).to_be_visible()
        expect(p.get_by_text("No jobs yet")).to_be_visible()
        expect(p.get_by_role("button", name="Sign out")).to_be_hidden()
        expect(p.get_by_role("heading", name="Sign in to alignd")).to_have_count(0)
        opened.finish(tmp_path / "no-key.png")


CANDIDATES = [
    {"prompt": "Name a colour.", "responses": ["Red.", "A chair.", "Blue, like the sky."]},
    {"prompt": "2+2?", "responses": ["4", "It is 4."]},
]


def test_feedback_datasets_and_models(world: World, page: Page, tmp_path: Path) -> None:
    """The other views with real data: a feedback set's progress and ratings with the labeling page's link
    and its export, a refused dataset upload's line-numbered report, and the models table."""
    from playwright.sync_api import expect

    with world.client() as client:
        candidates = upload_dataset(client, jsonl(CANDIDATES), "candidates").json()["id"]
        fbs = client.post(
            "/v1/feedback-sets", json={"name": "colours round", "candidates": candidates}
        ).json()
        item = client.get(f"/v1/feedback-sets/{fbs['id']}/next", params={"annotator": "ada"}).json()
        ranking = [r["id"] for r in item["responses"]]
        label = {"item": item["id"], "annotator": "ada", "ranking": ranking}
        assert client.post(f"/v1/feedback-sets/{fbs['id']}/labels", json=label).status_code == 201
    p = page.page
    page.sign_in("#/feedback")
    p.get_by_role("link", name="colours round").click()
    expect(p.get_by_role("heading", name="colours round")).to_be_visible()
    expect(p.get_by_role("link", name="Open the labeling page")).to_have_attribute(
        "href", f"/label/{fbs['id']}"
    )
    ratings = p.get_by_role("table", name="Ratings per item")
    expect(ratings.get_by_role("row")).to_have_count(3)
    p.get_by_role("button", name="Export ranking dataset").click()
    expect(p.get_by_role("status").filter(has_text="Exported")).to_contain_text("(1 item)")
    p.screenshot(path=str(tmp_path / "feedback.png"), full_page=True)

    p.get_by_role("navigation", name="Main").get_by_role("link", name="Datasets").click()
    p.get_by_label("JSONL file").set_input_files(
        files=[
            {"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": b'{"prompt": "a"}\nnot json\n'}
        ]
    )
    p.get_by_label("Kind").select_option("sft")
    p.get_by_role("button", name="Upload and validate").click()
    report = p.get_by_role("table", name="Problems found (line numbers in the file)")
    expect(report.get_by_role("row")).to_have_count(3)  # the header and lines 1 and 2
    expect(report.get_by_role("row").nth(1)).to_contain_text("1")
    expect(report.get_by_role("row").nth(2)).to_contain_text("2")
    expect(p.get_by_role("alert")).to_contain_text("invalid_dataset")
    p.screenshot(path=str(tmp_path / "refused-upload.png"), full_page=True)

    p.get_by_role("navigation", name="Main").get_by_role("link", name="Models").click()
    expect(p.get_by_role("table", name="Models").get_by_role("cell", name=world.model)).to_be_visible()

    page.finish(tmp_path / "datasets.png", expected=r"status of 422")  # the refused upload's answer


# In tests/conftest.py's SLOW_IN_MAKE_TEST: two chat jobs take 20-30 s on the shared cores.
def test_try_it_asks_two_models(world: World, page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    run_a = world.finished(world.runs["run-a"])["id"]
    with world.client() as client:
        artifacts = client.get(f"/v1/jobs/{run_a}/artifacts").json()["data"]
    adapter = next(a["id"] for a in artifacts if a["kind"] == "adapter")
    p = page.page
    page.sign_in("#/try")
    expect(p.get_by_label("Base model")).to_have_value(world.model)
    # A /v1 job's adapter faces the base: POST /openai/v1/chat/completions takes its art_ id as the model.
    p.get_by_label("Aligned model").select_option(label=f"run-a · {adapter}")
    p.get_by_role("textbox", name="Prompt", exact=True).fill("What colour is the sky?")
    p.get_by_label("Max tokens").fill("6")
    p.get_by_role("button", name="Ask both").click()
    expect(p.get_by_role("button", name="Ask both")).to_be_disabled()  # busy while the chat jobs run
    for side in ("Base", "Aligned"):
        region = p.get_by_role("region", name=side)
        expect(region.get_by_role("status")).to_contain_text("tokens, finish:", timeout=90_000)
    expect(p.get_by_role("button", name="Ask both")).to_be_enabled()
    with world.client() as client:
        chats = [
            j for j in client.get("/v1/jobs", params={"limit": 100}).json()["data"] if j["method"] == "chat"
        ]
    assert {(j["init_adapter"], j["status"]) for j in chats[:2]} == {
        (None, "succeeded"),
        (adapter, "succeeded"),
    }
    page.finish(tmp_path / "try-it.png")
