"""The web extension (web/fairhuman_jobs.js) in a real browser against a real ComfyUI.

Debian's chromium (/usr/bin/chromium) driven by Playwright for Python: nothing downloads a browser
(never run `playwright install`). The panel must load without console errors from the pack, show
a real background training job's progress as it runs (screenshots go to the test's tmp dir and to
/tmp/fairhuman_jobs_panel.png), cancel a job from its button, and refresh the LoRA lists when a job
finishes."""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the tests skip with the reason below
    sync_playwright = None

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK_URL_PART = "/extensions/fairhuman-hgdpo/"
SHOWCASE = Path("/tmp/fairhuman_jobs_panel.png")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: install Debian's chromium package ({CHROMIUM} is missing)")
    if sync_playwright is None:
        pytest.skip("playwright is not installed: pip install -r requirements-dev.txt (it drives "
                    f"{CHROMIUM}; never run `playwright install`)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Console:
    """Everything the page logged; the pack's own problems kept apart from ComfyUI's."""

    def __init__(self, page):
        self.messages, self.page_errors = [], []
        page.on("console", lambda m: self.messages.append((m.type, m.text, m.location.get("url", ""))))
        page.on("pageerror", lambda e: self.page_errors.append(e.stack or str(e)))

    def _is_pack(self, url: str, text: str) -> bool:
        return PACK_URL_PART in url or "/fairhuman/" in url or "fairhuman" in text.lower()

    def from_pack(self, kinds=("error",)) -> list[str]:
        """Errors thrown or logged by the pack's script, and failed requests for its files or routes."""
        found = [stack for stack in self.page_errors if PACK_URL_PART in stack]
        found += [f"{kind}: {text} ({url})" for kind, text, url in self.messages
                  if kind in kinds and self._is_pack(url, text)]
        return found

    def others(self) -> list[str]:
        """ComfyUI's own errors and warnings (its frontend logs several on every load)."""
        rest = [f"pageerror: {s.splitlines()[0]}" for s in self.page_errors if PACK_URL_PART not in s]
        rest += [f"{kind}: {text} ({url})" for kind, text, url in self.messages
                 if kind in ("error", "warning") and not self._is_pack(url, text)]
        return rest


def open_panel(page, server) -> Console:
    """Load ComfyUI in ``page`` and open the jobs tab as a user would; returns its console."""
    # A first visit opens ComfyUI's template browser over the canvas; a returning user's does not.
    request = urllib.request.Request(f"{server.url}/settings/Comfy.TutorialCompleted", data=b"true",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()
    console = Console(page)
    page.goto(server.url, wait_until="load", timeout=120_000)
    page.wait_for_function("() => window.fairhumanJobs && window.fairhumanJobs.store.status !== 'loading'",
                           timeout=120_000)
    page.locator(".p-dialog-mask").wait_for(state="detached", timeout=15_000)
    page.locator(".pi-chart-line").first.click()  # the tab's icon in the sidebar
    page.locator(".fh-jobs").wait_for(timeout=15_000)
    return console


def shoot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def report_console(console: Console) -> None:
    warnings = console.from_pack(("warning",))
    print(f"console warnings about the pack ({len(warnings)}):")
    for line in warnings:
        print("  " + line[:300])
    others = console.others()
    print(f"console messages not from the pack ({len(others)}):")
    for line in others:
        print("  " + line[:300])


def add_lora_loader(page) -> None:
    """A LoraLoader node on the canvas, whose dropdown must learn about the new LoRA."""
    page.evaluate("""() => {
        const node = window.LiteGraph.createNode("LoraLoader");
        node.pos = [420, 40];
        window.app.graph.add(node);
        window.fairhumanTestLoader = node;
    }""")


def loader_loras(page) -> list[str]:
    return page.evaluate("""() => window.fairhumanTestLoader.widgets
        .find((w) => w.name === "lora_name").options.values.slice()""")


def train_prompt(ckpt: str, dataset: str, output_name: str, steps: int) -> dict:
    return {"1": {"class_type": "FairHumanTrainLoRA", "inputs": {
        "ckpt_name": ckpt, "dataset": dataset, "output_name": output_name, "steps": steps,
        "resolution": 64, "rank": 4, "learning_rate": 1e-3, "weighting": "mpd", "mode": "background",
        "mixed_precision": "no",  # fp16 needs a GPU; ComfyUI runs on the CPU here
    }}, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}  # the loss plot


def server_jobs(server) -> dict[str, dict]:
    return {job["id"]: job for job in server.get("/fairhuman/jobs")["jobs"]}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def panel_row(page, job_id: str):
    return page.locator(f'.fh-job[data-job-id="{job_id}"]')


def test_panel_without_job_routes_says_so(browser, comfy_server, tmp_path):
    """A server whose pack has no job routes (the browser answers them 404 here): the panel says
    what to update, and nothing throws."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.route("**/api/fairhuman/jobs", lambda route: route.fulfill(status=404, body="Not Found"))
    try:
        page = context.new_page()
        console = open_panel(page, comfy_server)
        note = page.locator(".fh-jobs-note")
        note.wait_for(timeout=15_000)
        assert "no training-job routes" in note.inner_text()
        assert page.locator(".fh-job").count() == 0
        shoot(page, tmp_path, "panel-no-routes")
        # the 404 itself is the one line the browser logs about the pack; nothing the script throws
        pack = [m for m in console.from_pack(("error", "warning")) if "status of 404" not in m]
        report_console(console)
        assert not pack, pack
        assert not [s for s in console.page_errors if PACK_URL_PART in s]
    finally:
        context.close()


@pytest.mark.heavy
def test_panel_follows_cancels_and_refreshes_loras(browser, comfy_server, comfy_sd15_checkpoint, tmp_path):
    """Real background jobs of the Train FairHuman LoRA node: the panel shows the running job's
    step, losses and ETA from the pushed events, its Cancel button stops a job, and a finished job
    puts its LoRA into an open LoraLoader's dropdown without a reload."""
    from train_helpers import make_region_dataset

    ckpt = comfy_server.add_model("checkpoints", comfy_sd15_checkpoint)
    folder = "web panel photos"  # a space, as users name folders
    dataset = comfy_server.base_dir / "input" / folder
    shutil.rmtree(dataset, ignore_errors=True)
    make_region_dataset(dataset, count=2, size=64)

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    console = open_panel(page, comfy_server)
    existing = server_jobs(comfy_server)
    if not existing:
        assert "No training jobs yet" in page.locator(".fh-jobs").inner_text()
    else:
        assert page.locator(".fh-job").count() == len(existing)
    add_lora_loader(page)

    # 1. a job that runs to the end: progress while it runs, then its LoRA in the dropdown
    output = f"web_panel_{int(time.time())}"
    assert not [name for name in loader_loras(page) if output in name]  # the page has never heard of it
    comfy_server.run(train_prompt(ckpt, folder, output, steps=3), timeout=120)
    job_id = wait_for(lambda: next((i for i, j in server_jobs(comfy_server).items()
                                    if i not in existing and output in (j.get("lora_name") or "")), None),
                      60, "the job in GET /fairhuman/jobs")
    row = panel_row(page, job_id)
    row.wait_for(timeout=30_000)  # appeared from the pushed events, without a reload
    page.wait_for_function(
        """(id) => { const r = document.querySelector(`.fh-job[data-job-id="${id}"]`);
                     const bar = r && r.querySelector('.fh-progress');
                     return r && r.dataset.state === 'running' && bar && Number(bar.getAttribute('aria-valuenow')) >= 1; }""",
        arg=job_id, timeout=600_000)
    text = row.inner_text()
    assert "step " in text and "/ 3" in text, text
    assert row.locator(".fh-loss").count() >= 1, text
    assert row.locator(".fh-cancel").is_visible()
    assert float(row.locator(".fh-progress-fill").evaluate("e => parseFloat(e.style.width)")) > 0
    running_shot = shoot(page, tmp_path, "panel-running")
    shutil.copyfile(running_shot, SHOWCASE)
    print(f"screenshot: {SHOWCASE}")
    # a page opened mid-job lists it from GET /fairhuman/jobs, running
    late = browser.new_page(viewport={"width": 1280, "height": 800})
    late_console = open_panel(late, comfy_server)
    late_row = panel_row(late, job_id)
    late_row.wait_for(timeout=15_000)
    assert late_row.get_attribute("data-state") == "running"
    assert "/ 3" in late_row.inner_text()
    late.close()
    # the fallback for frontends without sidebar tabs renders the same live rows
    page.evaluate("() => window.fairhumanJobs.mountFloatingPanel()")
    page.locator(f'.fh-jobs-floating .fh-job[data-job-id="{job_id}"] .fh-progress').wait_for(timeout=10_000)
    shoot(page, tmp_path, "panel-running-floating")
    page.evaluate("() => document.querySelector('.fh-jobs-floating').remove()")

    page.wait_for_function(
        """(id) => { const r = document.querySelector(`.fh-job[data-job-id="${id}"]`);
                     return r && ['done', 'error', 'cancelled', 'interrupted'].includes(r.dataset.state); }""",
        arg=job_id, timeout=600_000)
    final = server_jobs(comfy_server)[job_id]
    assert final["state"] == "done", json.dumps(final)[:2000]
    assert row.get_attribute("data-state") == "done"
    assert row.locator(".fh-cancel").count() == 0
    lora_name = final["lora_name"]
    assert output in lora_name
    # the panel refreshes the node definitions once the job's process has exited (`finished`)
    wait_for(lambda: server_jobs(comfy_server)[job_id].get("finished"), 60, "the job's process to exit")
    wait_for(lambda: lora_name in loader_loras(page), 30, f"{lora_name} in LoraLoader's dropdown")
    assert page.evaluate("() => window.fairhumanJobs.store.modelRefreshes") >= 1
    page.evaluate("""(name) => { const w = window.fairhumanTestLoader.widgets.find((w) => w.name === "lora_name");
                                 w.value = name; window.app.graph.setDirtyCanvas(true, true); }""", lora_name)
    shoot(page, tmp_path, "panel-done")  # the new LoRA picked in the loader, no reload

    # 2. a long job cancelled from its button
    long_output = f"web_cancel_{int(time.time())}"
    comfy_server.run(train_prompt(ckpt, folder, long_output, steps=500), timeout=120)
    long_id = wait_for(lambda: next((i for i, j in server_jobs(comfy_server).items()
                                     if long_output in (j.get("lora_name") or "")), None),
                       60, "the long job in GET /fairhuman/jobs")
    long_row = panel_row(page, long_id)
    page.wait_for_function(
        """(id) => { const r = document.querySelector(`.fh-job[data-job-id="${id}"]`);
                     return r && r.dataset.state === 'running'; }""", arg=long_id, timeout=600_000)
    long_row.locator(".fh-cancel").click()
    page.wait_for_function(
        """(id) => { const r = document.querySelector(`.fh-job[data-job-id="${id}"]`);
                     return r && ['cancelled', 'interrupted'].includes(r.dataset.state); }""",
        arg=long_id, timeout=60_000)
    assert server_jobs(comfy_server)[long_id]["state"] in ("cancelled", "interrupted")
    shoot(page, tmp_path, "panel-cancelled")

    page.close()
    for each in (console, late_console):
        report_console(each)
        pack = each.from_pack()
        assert not pack, "console errors from the pack:\n" + "\n".join(pack)
