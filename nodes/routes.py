"""The pack's HTTP routes (ComfyUI also serves them under /api/...):

- ``GET /fairhuman/jobs`` -> ``{"jobs": [{id, method, state, step, total, losses, eta_s, lora_name,
  run_dir, error, queue_position, queued_behind, devices, validation, best_lora_name, ...}]}``, newest
  first; ``state`` is queued | running | done | error | cancelled | interrupted, and a queued job's
  ``queue_position`` (1-based) and ``queued_behind`` (the id of the job it waits for) say where it is;
- ``GET /fairhuman/jobs/{id}`` -> the same summary plus ``events`` (the recent events);
- ``POST /fairhuman/jobs/{id}/cancel`` -> the job after it stopped (SIGTERM: checkpoint, resumable),
  or, queued, after it left the queue (nothing of it stays).

ComfyUI can listen on all interfaces: an id is matched against the manager's jobs (never used
as a path), and nothing here reads or writes outside the runs folder.
"""
from __future__ import annotations

import asyncio
import logging

from .job_manager import JOB_ID, comfy_manager

log = logging.getLogger("fairhuman-hgdpo")


def _json(web, data, status: int = 200):
    return web.json_response(data, status=status)


def _job_or_404(web, request):
    job_id = request.match_info.get("job_id", "")
    if not JOB_ID.match(job_id):
        return None, _json(web, {"error": "a job id is 12 hexadecimal characters"}, 400)
    job = comfy_manager().job(job_id)
    if job is None:
        return None, _json(web, {"error": f"no job {job_id}"}, 404)
    return job, None


def register(routes) -> None:
    from aiohttp import web

    @routes.get("/fairhuman/jobs")
    async def list_jobs(request):
        return _json(web, {"jobs": comfy_manager().list()})

    @routes.get("/fairhuman/jobs/{job_id}")
    async def get_job(request):
        job, error = _job_or_404(web, request)
        return error or _json(web, job.details())

    @routes.post("/fairhuman/jobs/{job_id}/cancel")
    async def cancel_job(request):
        job, error = _job_or_404(web, request)
        if error:
            return error
        if job.finished.is_set() and not job.alive():
            return _json(web, {**job.summary(), "error": job.summary()["error"],
                               "message": f"job {job.id} is not running (state {job.state})"}, 409)
        # waiting for the process (up to 10 s) must not block the server's event loop
        await asyncio.get_running_loop().run_in_executor(None, comfy_manager().cancel, job.id)
        return _json(web, job.summary())


def _register_with_comfyui() -> None:
    try:
        from server import PromptServer
    except ImportError:  # imported outside ComfyUI (tests of the pack itself)
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    register(instance.routes)
    try:
        comfy_manager()  # read the job records now: a job left running by a restart is marked
    except Exception:
        log.exception("fairhuman: reading the job records failed")


_register_with_comfyui()
