"""The dashboard in a real browser: headless Chromium (Debian's, `.ci/browser.sh` installs it) driven by
Playwright, against the API served by uvicorn on a loopback port. The service's rows are written straight
into its store: no training runs."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from service_fixtures import live_app, make_key

from tunesmith.serve import progress
from tunesmith.serve.service import Service, Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROJECT = "acme"
FILENAME = "<b>x</b>.jsonl"
EVIL_MESSAGE = "<img src=x id=injected> should show as text"
TIMEOUT_MS = 8000
LONG_STEPS = 130  # more than one page (100) of events
RL_STEPS = 4
RL_WARNING = "possible reward hacking: the training reward rose while val_reward fell"

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]' (never `playwright install`)"
)
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: `source .ci/browser.sh` installs Debian's chromium (as root)", allow_module_level=True
    )
expect = playwright_api.expect


class Site:
    """A service holding one project's rows: four jobs (running with metrics, queued, succeeded, a longer
    finished one whose metrics take two pages of events), a file whose name is markup, an adapter."""

    def __init__(self, home: Path):
        self.service = Service(Settings(home=home, base_models={"tiny": "tiny"}))
        store = self.service.store
        self.keys = {scope: make_key(self.service, PROJECT, scope) for scope in ("read", "write")}
        self.file = store.add_file(
            PROJECT, filename=FILENAME, purpose="fine-tune", bytes=10, sha256="0" * 64, format="messages", examples=3
        )
        job = dict(
            model="tiny",
            training_file=self.file["id"],
            method="supervised",
            seed=0,
            hyperparameters={"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"},
        )
        self.done = store.add_job(
            PROJECT,
            **job,
            status="succeeded",
            created_at=1_700_000_000,
            fine_tuned_model="ft:tiny:demo:ftjob-done",
            trained_tokens=12345,
        )
        self.report = self.service.add_result_file(
            PROJECT, f"{self.done['id']}-eval.json", json.dumps(evaluation_report()).encode()
        )
        store.update_job(self.done["id"], ("succeeded",), result_files=[self.report], validation_file=self.file["id"])
        store.add_model(PROJECT, "ft:tiny:demo:ftjob-done", self.done["id"], "tiny")
        self.long = store.add_job(PROJECT, **job, status="failed", created_at=1_700_000_050)
        for step in range(1, LONG_STEPS + 1):
            store.add_event(
                self.long["id"], f"Step {step}", type="metrics", data={"step": step, "train_loss": 1 / step}
            )
        self.rl = store.add_job(
            PROJECT, **{**job, "method": "reinforcement"}, status="failed", created_at=1_700_000_070
        )
        self.add_rl_lines()
        self.queued = store.add_job(PROJECT, **job, status="queued", created_at=1_700_000_100)
        self.running = store.add_job(PROJECT, **job, status="running", created_at=1_700_000_200)
        store.add_event(self.running["id"], "Fine-tuning job started on worker w1")
        store.add_event(self.running["id"], EVIL_MESSAGE, level="warn")
        for step in range(1, 6):
            self.add_train_loss(step)
            if step % 2 == 0:
                valid_loss = 2.2 - 0.25 * step
                store.add_event(
                    self.running["id"],
                    f"Step {step}: validation loss={valid_loss:.4f}",
                    type="metrics",
                    data={"step": step, "valid_loss": valid_loss},
                    key=f"val-{step}",
                )
                store.add_checkpoint(
                    self.running["id"],
                    step,
                    {"step": step, "train_loss": self.train_loss(step), "valid_loss": valid_loss},
                )

    def add_rl_lines(self) -> None:
        """A GRPO run's metrics lines, through the worker's own reading (serve/progress.py): the training reward
        rises while the validation reward falls, and the reward-hacking monitor's line says so."""
        lines = [
            {"step": step, "loss": 0.1, "reward": 0.1 * step, "entropy": 2.0, "response_length": 30.0 + step}
            for step in range(1, RL_STEPS + 1)
        ]
        lines += [{"step": 2, "val_reward": 0.8}, {"step": 4, "val_reward": 0.5}]
        lines.append({"step": 4, "monitor": "reward_hacking", "warning": RL_WARNING})
        known = progress.Progress()
        for line in sorted(lines, key=lambda line: line["step"]):
            for event in progress.events_of(line, known):
                self.service.store.add_event(
                    self.rl["id"], event.message, type=event.type, data=event.data, key=event.key
                )

    @staticmethod
    def train_loss(step: int) -> float:
        return 2.5 / (1 + 0.4 * step)

    def add_train_loss(self, step: int) -> None:
        loss = self.train_loss(step)
        self.service.store.add_event(
            self.running["id"],
            f"Step {step}: training loss={loss:.4f}",
            type="metrics",
            data={"step": step, "train_loss": loss, "total_steps": 10},
            key=f"train-{step}",
        )


def evaluation_report() -> dict:
    """An evaluation report as `tunesmith eval` writes it (the metrics module's own shapes): per example, the
    summed token log-likelihood and the token count of the fine-tuned model and of its base."""
    from tunesmith.eval import metrics

    tuned, base = [(-2.0, 10), (-3.0, 12), (-2.5, 9)], [(-9.0, 10), (-11.0, 12), (-8.0, 9)]
    return {
        "task": "perplexity",
        "n": 3,
        "metrics": metrics.score("perplexity", tuned, None, resamples=200),
        "baselines": {"base": {"metrics": metrics.score("perplexity", base, None, resamples=200)}},
        "comparisons": {"base": metrics.compare("perplexity", tuned, base, None, resamples=200)},
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[Site, str]]:
    """The site and the server's root URL (the app under uvicorn on loopback, no worker)."""
    site = Site(tmp_path_factory.mktemp("dashboard") / "home")
    with live_app(site.service, worker=False) as api_url:
        yield site, api_url.removesuffix("/v1")
    site.service.store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, site):
    """A fresh tab (its own sessionStorage); fails the test on any CSP violation, script error or request that
    leaves the server."""
    _, base = site
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on(
        "console",
        lambda message: (
            message.type == "error"
            and "401" not in message.text
            and "403" not in message.text
            and problems.append(message.text)
        ),
    )
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: request.url.startswith(base) or problems.append(request.url))
    page.on("dialog", lambda dialog: dialog.accept())  # the Cancel button asks "Cancel job ...?"
    page.goto(f"{base}/dashboard")
    yield page
    context.close()
    assert problems == []


def enter_key(page, key: str) -> None:
    page.fill("#key-input", key)
    page.click("#key-submit")


def job_row(page, job_id: str):
    return page.locator(f'#jobs tbody tr[data-job-id="{job_id}"]')


def test_page_is_self_contained_and_sent_with_security_headers(site):
    _, base = site
    with urllib.request.urlopen(f"{base}/dashboard") as response:
        headers, html = response.headers, response.read().decode()
    policy = headers["Content-Security-Policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy)[1]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert headers["X-Frame-Options"] == "DENY"
    assert html.count(f'nonce="{nonce}"') == 2  # the one <style> and the one <script>
    assert re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) is None  # no external asset


def test_jobs_curve_events_and_files(page, site, tmp_path):
    site, _ = site
    enter_key(page, site.keys["read"])
    row = job_row(page, site.running["id"])
    expect(row.locator(".status")).to_have_text("running")
    expect(row.locator(".status")).to_have_class(re.compile("status-running"))
    expect(job_row(page, site.done["id"])).to_contain_text("ft:tiny:demo:ftjob-done")
    expect(job_row(page, site.done["id"])).to_contain_text("12,345")
    # the filename is text, not markup
    names = page.locator("#files .filename")
    expect(names).to_have_count(2)  # made in the same second: either may be listed first
    assert sorted(names.all_inner_texts()) == sorted([f"{site.done['id']}-eval.json", FILENAME])
    assert page.locator("#files b").count() == 0
    expect(page.locator("#adapters")).to_contain_text("ft:tiny:demo:ftjob-done")
    expect(page.locator("#base-models")).to_have_text("tiny")
    # the key lives in sessionStorage only
    assert page.evaluate("sessionStorage.getItem('tunesmith.api_key')") == site.keys["read"]
    assert site.keys["read"] not in page.url and page.context.cookies() == []
    save_screenshot(page, tmp_path / "jobs.png", "/tmp/dashboard-jobs.png")

    row.click()
    chart = page.locator("#chart svg")
    expect(chart).to_have_attribute("data-train-points", "5")
    expect(chart).to_have_attribute("data-valid-points", "2")
    assert chart.locator("circle.point-train").count() == 5 and chart.locator("circle.point-valid").count() == 2
    expect(page.locator("#job-facts")).to_contain_text("step 5 of 10")
    expect(page.locator("#job-facts")).to_contain_text(FILENAME)
    # events newest first, the injected markup shown as text
    messages = page.locator("#events tbody td:nth-child(3)")
    expect(messages.first).to_have_text("Step 5: training loss=0.8333")
    expect(messages.last).to_have_text("Fine-tuning job started on worker w1")
    expect(page.locator("#events")).to_contain_text(EVIL_MESSAGE)
    assert page.locator("#injected").count() == 0
    # checkpoints carry the evaluation figures; the lower validation loss is marked best
    checkpoints = page.locator("#checkpoints tbody tr")
    expect(checkpoints).to_have_count(2)
    expect(page.locator('#checkpoints tr[data-step="4"] td.best')).to_have_text("1.2000")
    expect(page.locator("#cancel")).to_be_hidden()  # a read key: Cancel is offered to write keys only
    save_screenshot(page, tmp_path / "job.png", "/tmp/dashboard-job.png")

    # live: a new metrics event reaches the open page on the next refresh (every 2.5 s while a job runs)
    site.add_train_loss(6)
    expect(chart).to_have_attribute("data-train-points", "6")
    expect(chart.locator("circle.point-train")).to_have_count(6)
    expect(messages.first).to_have_text("Step 6: training loss=0.7353")


def test_a_finished_job_shows_its_evaluation_against_the_base(page, site, tmp_path):
    site, _ = site
    report = evaluation_report()
    enter_key(page, site.keys["read"])
    job_row(page, site.running["id"]).click()
    expect(page.locator("#evaluation-note")).to_have_text("No evaluation: the job has no validation file.")
    job_row(page, site.done["id"]).click()
    rows = page.locator("#evaluation tbody tr")
    expect(rows).to_have_count(3)
    expect(page.locator("#evaluation thead th")).to_have_text(["System", "loss", "perplexity"])
    tuned, base, diff = (
        report["metrics"]["perplexity"],
        report["baselines"]["base"]["metrics"]["perplexity"],
        report["comparisons"]["base"]["perplexity"],
    )

    def shown(system: str) -> list[float]:  # "value [low, high]" in the perplexity column
        cell = page.locator(f'#evaluation tr[data-system="{system}"] td').nth(2).inner_text()
        return [float(number) for number in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", cell)]

    assert shown("fine-tuned") == pytest.approx([tuned["value"], *tuned["ci95"]], rel=1e-3)
    assert shown("base") == pytest.approx([base["value"], *base["ci95"]], rel=1e-3)
    assert shown("fine-tuned − base") == pytest.approx([diff["diff"], *diff["ci95"]], rel=1e-3)
    assert diff["ci95"][1] < 0  # the fixture's fine-tuned model is better than its base, clearly
    expect(page.locator("#evaluation-note")).to_have_text(
        f"perplexity on 3 validation examples; report file {site.report}."
    )
    save_screenshot(page, tmp_path / "evaluation.png", "/tmp/dashboard-evaluation.png")


def test_curve_of_a_job_with_more_than_a_page_of_events(page, site):
    site, _ = site
    enter_key(page, site.keys["read"])
    job_row(page, site.long["id"]).click()
    expect(page.locator("#chart svg")).to_have_attribute("data-train-points", str(LONG_STEPS))
    expect(page.locator("#chart svg circle.point-train")).to_have_count(LONG_STEPS)
    expect(page.locator("#events tbody tr")).to_have_count(LONG_STEPS)
    expect(page.locator("#job-status")).to_have_class(re.compile("status-failed"))
    expect(page.locator("#cancel")).to_be_hidden()


def test_an_rl_job_shows_its_reward_curves_and_its_monitors_warning(page, site, tmp_path):
    site, _ = site
    enter_key(page, site.keys["read"])
    job_row(page, site.running["id"]).click()
    expect(page.locator("#chart svg")).to_have_attribute("data-valid-points", "2")  # rendered
    expect(page.locator("#rl")).to_be_hidden()  # a supervised job has no RL section
    job_row(page, site.rl["id"]).click()
    expect(page.locator('#monitors li[data-monitor="reward_hacking"]')).to_have_text(f"step 4: {RL_WARNING}")
    charts = page.locator("#rl-charts svg")
    expect(charts).to_have_count(3)  # reward, reply length, entropy
    expect(charts.nth(0)).to_have_attribute("aria-label", "reward")
    expect(charts.nth(0)).to_have_attribute("data-train-points", str(RL_STEPS))
    expect(charts.nth(0)).to_have_attribute("data-valid-points", "2")
    expect(page.locator("#rl-charts line.monitor-mark")).to_have_count(3)  # the warning's step on each chart
    expect(page.locator("#events")).to_contain_text(f"Step 4: warning: {RL_WARNING}")
    save_screenshot(page, tmp_path / "rl.png", "/tmp/dashboard-rl.png")


def test_cancel_needs_a_write_key(page, site, tmp_path):
    site, _ = site
    enter_key(page, site.keys["read"])
    job_row(page, site.queued["id"]).click()
    expect(page.locator("#job-title")).to_have_text(site.queued["id"])
    expect(page.locator("#job-status")).to_have_text("queued")
    expect(page.locator("#cancel")).to_be_hidden()  # a read key is not offered an action it cannot take

    page.click("#forget-key")
    expect(page.locator("#main")).to_be_hidden()
    enter_key(page, site.keys["write"])
    job_row(page, site.queued["id"]).click()
    expect(page.locator("#cancel")).to_be_visible()
    page.click("#cancel")
    expect(page.locator("#cancel-message")).to_have_text("Job cancelled.")
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(job_row(page, site.queued["id"]).locator(".status")).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "cancelled.png"), full_page=True)
    # a running job is flagged and shown cancelled at once, as OpenAI does; its worker stops it (none here)
    job_row(page, site.running["id"]).click()
    expect(page.locator("#job-title")).to_have_text(site.running["id"])
    expect(page.locator("#cancel-message")).to_be_hidden()
    page.click("#cancel")
    expect(page.locator("#cancel-message")).to_have_text("Job cancelled.")
    expect(page.locator("#job-status")).to_have_text("cancelled")
    assert site.service.store.job(PROJECT, site.running["id"])["cancel_requested"]


def test_wrong_key_shows_the_401_message(page, site, tmp_path):
    site, _ = site
    wrong = site.keys["read"][:-4] + "AAAA"
    enter_key(page, wrong)
    expect(page.locator("#error")).to_have_text("Error 401: Incorrect API key provided.")
    expect(page.locator("#main")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('tunesmith.api_key')") is None  # a rejected key is not kept
    page.screenshot(path=str(tmp_path / "wrong-key.png"), full_page=True)


def save_screenshot(page, path: Path, copy_to: str) -> None:
    page.screenshot(path=str(path), full_page=True)
    shutil.copyfile(path, copy_to)
