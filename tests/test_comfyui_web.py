"""The web extension (web/fairhuman_jobs.js) in a real browser against a real ComfyUI, on every
frontend available.

Debian's chromium (/usr/bin/chromium) driven by Playwright for Python: nothing downloads a browser
(never run `playwright install`). Frontends: each ComfyUI tree's own (``comfyui_harness``'s trees,
e.g. 0.3.64 with 1.27.10, 0.8.0 with 1.35.9, 0.33.0 with 1.49.6), plus every unzipped
``comfyui-frontend-package`` under ~/frontends/<version>/ (served by the newest tree with
``--front-end-root``; see docs/testing.md), e.g. 1.58.1:

    pip download --no-deps comfyui-frontend-package==1.58.1 -d ~/frontends
    python -m zipfile -e ~/frontends/comfyui_frontend_package-1.58.1-py3-none-any.whl ~/frontends/1.58.1

The panel must load without console errors from the pack, list a running job with its progress,
show a queued one with its place, cancel from its button, refresh the LoRA lists when a job
finishes, and the Train node must show its loss plot when done. Screenshots go to /tmp/shots/
(``FAIRHUMAN_SHOTS`` to change) named by frontend."""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the tests skip with the reason below
    sync_playwright = None

import comfyui_harness

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK_URL_PART = "/extensions/fairhuman-hgdpo/"
SHOTS = Path(os.environ.get("FAIRHUMAN_SHOTS", "/tmp/shots"))
FRONTENDS = Path.home() / "frontends"  # <version>/comfyui_frontend_package/static, unzipped wheels


def shipped_frontend(tree: Path) -> str | None:
    """The comfyui-frontend-package version a tree's venv has installed."""
    venv = comfyui_harness.comfyui_python(tree).parent.parent
    found = sorted(venv.glob("lib/python*/site-packages/comfyui_frontend_package-*.dist-info"))
    return found[-1].name.removesuffix(".dist-info").split("-")[1] if found else None


def frontend_matrix() -> list:
    """(tree, frontend root or None for the tree's own, label): each tree with its own frontend,
    then each frontend in ~/frontends that no tree ships, on the newest tree."""
    trees = comfyui_harness.comfyui_trees()
    matrix = [(tree, None, f"{comfyui_harness.version_label(tree)}-fe{shipped_frontend(tree)}") for tree in trees]
    shipped = {shipped_frontend(tree) for tree in trees}
    for root in sorted(FRONTENDS.glob("*/comfyui_frontend_package/static")) if trees else []:
        version = root.parent.parent.name
        if version not in shipped:
            matrix.append((trees[-1], root, f"{comfyui_harness.version_label(trees[-1])}-fe{version}"))
    return matrix


MATRIX = frontend_matrix()


@pytest.fixture(scope="module", params=MATRIX or [None], ids=[label for *_, label in MATRIX] or ["none"])
def web_server(request, tmp_path_factory):
    """A ComfyUI serving one frontend of the matrix; ``label`` names it in screenshots."""
    if request.param is None:
        pytest.skip(comfyui_harness.missing_reason() or "no ComfyUI tree")
    tree, root, label = request.param
    base = tmp_path_factory.mktemp(f"web-{label}")
    server = comfyui_harness.ComfyServer(base, tree=tree)
    if root is not None:  # ComfyUI reads --front-end-root from its command line only: a wrapper adds it
        wrapper = base / "python-with-frontend"
        wrapper.write_text(f'#!/bin/sh\nexec "{server.python}" "$@" --front-end-root "{root}"\n')
        wrapper.chmod(0o755)
        server.python = wrapper
    server.start()
    server.label = label
    yield server
    server.stop()


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
    # the tab's icon in the sidebar; dispatched to it, since a toast or the missing-models dialog of
    # the template workflow may lie over the sidebar for a moment
    page.locator(".pi-chart-line").first.dispatch_event("click")
    page.locator(".fh-jobs").wait_for(timeout=15_000)
    return console


def shoot(page, server, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{server.label}-{name}.png"
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


TRAIN_INPUTS = {"resolution": 64, "rank": 4, "learning_rate": 1e-3, "weighting": "mpd",
                "mixed_precision": "no"}  # fp16 needs a GPU; ComfyUI runs on the CPU here


def train_prompt(ckpt: str, dataset: str, output_name: str, steps: int) -> dict:
    return {"1": {"class_type": "FairHumanTrainLoRA", "inputs": {
        "ckpt_name": ckpt, "dataset": dataset, "output_name": output_name, "steps": steps, "mode": "background",
        **TRAIN_INPUTS}}}


def queue_train_node(page, ckpt: str, dataset: str, output_name: str, steps: int) -> int:
    """A Train FairHuman LoRA node in wait mode alone on the canvas (the template workflow a fresh
    ComfyUI opens names models this one lacks), queued from the browser as a user does (the
    frontend builds the prompt); returns its node id."""
    values = {"ckpt_name": ckpt, "dataset": dataset, "output_name": output_name, "steps": steps, "mode": "wait",
              **TRAIN_INPUTS}
    return page.evaluate("""async (values) => {
        window.app.graph.clear();
        const node = window.LiteGraph.createNode("FairHumanTrainLoRA");
        node.pos = [60, 300];
        window.app.graph.add(node);
        for (const [name, value] of Object.entries(values)) {
            const widget = node.widgets.find((w) => w.name === name);
            if (!widget) throw new Error(`no widget ${name}`);
            widget.value = value;
        }
        await window.app.queuePrompt(0, 1);
        return node.id;
    }""", values)


def node_images(page, node_id: int) -> int:
    """How many images the frontend shows on a node: its output store (newer frontends) or the
    node's own images (older ones); feature-detected."""
    return page.evaluate("""(id) => {
        const app = window.app;
        const outputs = app.nodeOutputs || {};
        const stored = outputs[id] || outputs[String(id)];
        const node = app.graph.getNodeById(id);
        return Math.max(stored?.images?.length || 0, node?.imgs?.length || 0, node?.images?.length || 0);
    }""", node_id)


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


def test_panel_without_job_routes_says_so(browser, web_server):
    """A server whose pack has no job routes (the browser answers them 404 here): the panel says
    what to update, and nothing throws."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.route("**/api/fairhuman/jobs", lambda route: route.fulfill(status=404, body="Not Found"))
    try:
        page = context.new_page()
        console = open_panel(page, web_server)
        note = page.locator(".fh-jobs-note")
        note.wait_for(timeout=15_000)
        assert "no training-job routes" in note.inner_text()
        assert page.locator(".fh-job").count() == 0
        shoot(page, web_server, "panel-no-routes")
        # the 404 itself is the one line the browser logs about the pack; nothing the script throws
        pack = [m for m in console.from_pack(("error", "warning")) if "status of 404" not in m]
        report_console(console)
        assert not pack, pack
        assert not [s for s in console.page_errors if PACK_URL_PART in s]
    finally:
        context.close()


def row_state(page, job_id: str, states: tuple, timeout_s: float) -> None:
    page.wait_for_function(
        """([id, states]) => { const r = document.querySelector(`.fh-job[data-job-id="${id}"]`);
                               return r && states.includes(r.dataset.state); }""",
        arg=[job_id, list(states)], timeout=timeout_s * 1000)


def job_named(server, output: str, timeout: float = 60) -> str:
    return wait_for(lambda: next((i for i, j in server_jobs(server).items() if j.get("output_name") == output), None),
                    timeout, f"job {output} in GET /fairhuman/jobs")


@pytest.mark.heavy
def test_panel_queues_follows_cancels_and_the_node_shows_its_loss_plot(browser, web_server, comfy_sd15_checkpoint):
    """Real jobs of the Train FairHuman LoRA node on one device (the CPU): a long background job
    runs, a short one and a wait-mode node queued from the browser wait behind it (the panel shows
    each one's place and whom it waits for); cancelling the long one from its button starts the
    next (its progress in the panel), whose LoRA reaches an open LoraLoader's dropdown; then the
    wait-mode node runs and shows its loss plot."""
    from train_helpers import make_region_dataset

    server = web_server
    ckpt = server.add_model("checkpoints", comfy_sd15_checkpoint)
    folder = "web panel photos"  # a space, as users name folders
    dataset = server.base_dir / "input" / folder
    shutil.rmtree(dataset, ignore_errors=True)
    make_region_dataset(dataset, count=2, size=64)

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    console = open_panel(page, server)
    stamp = int(time.time())
    long_output, short_output, node_output = f"web_long_{stamp}", f"web_short_{stamp}", f"web_node_{stamp}"

    # 1. a long job runs; a short one and a wait-mode node queue behind it
    server.run(train_prompt(ckpt, folder, long_output, steps=500), timeout=120)
    long_id = job_named(server, long_output)
    server.run(train_prompt(ckpt, folder, short_output, steps=2), timeout=120)
    short_id = job_named(server, short_output)
    node_id = queue_train_node(page, ckpt, folder, node_output, steps=2)
    queued_id = job_named(server, node_output, timeout=120)
    add_lora_loader(page)
    assert not [name for name in loader_loras(page) if short_output in name]
    jobs = server_jobs(server)
    assert jobs[short_id]["state"] == "queued" and jobs[short_id]["queue_position"] == 1
    assert jobs[short_id]["queued_behind"] == long_id
    assert (jobs[queued_id]["queue_position"], jobs[queued_id]["queued_behind"]) == (2, short_id)
    row_state(page, queued_id, ("queued",), 30)
    short_row = panel_row(page, short_id)
    assert short_row.get_attribute("data-state") == "queued"
    assert f"#1 in the queue · behind {long_output}" in short_row.inner_text()
    assert f"#2 in the queue · behind {short_output}" in panel_row(page, queued_id).inner_text()
    assert short_row.locator(".fh-cancel").is_visible()  # a queued job can be taken out

    # 2. the long job's progress shows, then its Cancel button stops it
    page.wait_for_function(
        """(id) => { const r = document.querySelector(`.fh-job[data-job-id="${id}"]`);
                     const bar = r && r.querySelector('.fh-progress');
                     return r && r.dataset.state === 'running' && bar && Number(bar.getAttribute('aria-valuenow')) >= 1; }""",
        arg=long_id, timeout=600_000)
    long_row = panel_row(page, long_id)
    assert "step " in long_row.inner_text() and "/ 500" in long_row.inner_text()
    assert long_row.locator(".fh-loss").count() >= 1
    shoot(page, server, "panel-running-and-queued")
    # a page opened now lists the same jobs from GET /fairhuman/jobs
    late = browser.new_page(viewport={"width": 1280, "height": 800})
    late_console = open_panel(late, server)
    panel_row(late, short_id).wait_for(timeout=15_000)
    assert panel_row(late, long_id).get_attribute("data-state") == "running"
    assert panel_row(late, short_id).get_attribute("data-state") == "queued"
    late.close()
    long_row.locator(".fh-cancel").click()
    row_state(page, long_id, ("cancelled", "interrupted"), 60)
    assert server_jobs(server)[long_id]["state"] in ("cancelled", "interrupted")

    # 3. the short job starts at once, shows its progress, ends done; its LoRA reaches LoraLoader
    row_state(page, short_id, ("running", "done"), 60)
    page.wait_for_function(
        """(id) => { const r = document.querySelector(`.fh-job[data-job-id="${id}"]`);
                     const bar = r && r.querySelector('.fh-progress');
                     return r && bar && Number(bar.getAttribute('aria-valuenow')) >= 1; }""",
        arg=short_id, timeout=600_000)
    assert "#1 in the queue · behind " + short_output in panel_row(page, queued_id).inner_text()
    shoot(page, server, "panel-cancelled-next-running")
    row_state(page, short_id, ("done", "error", "cancelled", "interrupted"), 600)
    final = server_jobs(server)[short_id]
    assert final["state"] == "done", json.dumps(final)[:2000]
    wait_for(lambda: server_jobs(server)[short_id].get("finished"), 60, "the job's process to exit")
    wait_for(lambda: final["lora_name"] in loader_loras(page), 30, f"{final['lora_name']} in LoraLoader's dropdown")
    page.evaluate("() => { window.app.graph.remove(window.fairhumanTestLoader); }")

    # 4. the wait-mode node runs next and shows its loss plot on the node
    row_state(page, queued_id, ("done", "error", "cancelled", "interrupted"), 900)
    assert server_jobs(server)[queued_id]["state"] == "done", json.dumps(server_jobs(server)[queued_id])[:2000]
    wait_for(lambda: node_images(page, node_id) >= 1, 120, "the loss plot on the Train node")
    page.evaluate("""(id) => {  // the whole node, plot included, in view beside the panel
        const app = window.app, n = app.graph.getNodeById(id), ds = app.canvas.ds;
        app.canvas.selectNode?.(n);
        if (ds?.offset) {
            const scale = Math.min(1, 780 / (n.size[1] + 60));
            ds.scale = scale;
            ds.offset[0] = 420 / scale - n.pos[0];
            ds.offset[1] = 80 / scale - n.pos[1];
        }
        app.graph.setDirtyCanvas(true, true);
    }""", node_id)
    time.sleep(1)  # one frame for the canvas to draw the image
    shoot(page, server, "node-loss-plot")

    page.close()
    for each in (console, late_console):
        report_console(each)
        pack = each.from_pack()
        assert not pack, "console errors from the pack:\n" + "\n".join(pack)
