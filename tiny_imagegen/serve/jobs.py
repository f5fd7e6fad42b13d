"""The job queue and its one worker: jobs run in submission order, one at a time (one device).

A job is one `generate` prompt (its checked arguments, from params.py). The worker takes the
pipeline from the pool, runs the command's `render` and writes each image with `save_png`, as the
command does. Everything a client may watch is an event appended to the job's list:

  queued {position}, started, step {step, total, preview?}, done {images}, error {message},
  cancelled

`preview` is a small PNG (data URL) of the decoded latents after the step, made only while a
client is subscribed to the job's events (decoding costs a VAE pass per step). Cancelling a
running job raises in the step callback, so it stops at the next step; the pipeline's arrays of
that run are then freed (gc, mx.clear_cache). A queued job is just taken off the queue.
"""

import base64
import gc
import io
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..commands.rendering import render, sampler_options
from ..commands.inputs import EditInputs, UsageError
from ..commands.metadata import read_parameters, save_png

PREVIEW_SIDE = 128  # pixels, the longer side of a step preview
FINAL = ("done", "error", "cancelled")
KEEP_JOBS = 1000  # finished jobs GET /api/jobs/{id} still knows (their images stay on disk regardless)
KEEP_PREVIEWS = 8  # finished jobs whose step previews are kept for late subscribers


class Cancelled(Exception):
    pass


class QueueFull(Exception):
    pass


@dataclass
class Job:
    id: str
    args: object  # generate's arguments (argparse.Namespace)
    job: object  # the command's inputs.Job: prompt, seeds, size
    paths: list[Path]
    parameters: dict  # the request's fields as given (shown by GET /api/jobs/{id})
    state: str = "queued"  # queued | running | done | error | cancelled
    events: list[dict] = field(default_factory=list)
    error: str | None = None
    error_kind: str | None = None  # "usage" (a 400 for the OpenAI route) or "internal"
    images: list[dict] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    finished_seq: int | None = None  # the order in which jobs finished
    peak_memory: int = 0  # bytes, the largest phase peak of this job's run
    active_memory: int = 0  # bytes in use after the job (the loaded models, nothing of the job)
    watchers: int = 0  # clients subscribed to the events
    last_step: dict = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    edit: EditInputs = field(default_factory=EditInputs)  # the input images (POST /v1/images/edits)

    def emit(self, event: dict) -> None:
        self.events.append({"type": event.pop("type"), **event, "time": round(time.time(), 3)})

    def summary(self, position: int | None) -> dict:
        steps = [e for e in self.events if e["type"] == "step"]
        return {"id": self.id, "state": self.state, "position": position, "parameters": self.parameters,
                "progress": {"step": steps[-1]["step"], "total": steps[-1]["total"]} if steps else None,
                "images": self.images, "error": self.error, "peak_memory": self.peak_memory,
                "active_memory": self.active_memory, "created": self.created}


def small_png(image) -> str:
    """A PIL image -> a data URL of a PNG at most PREVIEW_SIDE pixels on its longer side."""
    image = image.copy()
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Worker:
    """One thread running the queued jobs in order."""

    def __init__(self, pool, max_queue: int):
        self.pool, self.max_queue = pool, max_queue
        self.jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._ready = threading.Condition()
        self._finished = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tiny-imagegen-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._ready:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting): try again later")
            self.jobs[job.id] = job
            self._queue.append(job)
            job.emit({"type": "queued", "position": len(self._queue)})
            self._ready.notify()

    def position(self, job: Job) -> int | None:
        """1 for the next job to run; None once it runs."""
        with self._ready:
            return next((i for i, j in enumerate(self._queue, 1) if j is job), None)

    def cancel(self, job: Job) -> None:
        with self._ready:
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, "cancelled", {"type": "cancelled"})
                return
        job.cancel.set()  # running: stops at its next step

    def stop(self) -> None:
        with self._ready:
            self._stop = True
            for job in list(self._queue):
                self._finish(job, "cancelled", {"type": "cancelled"})
            self._queue.clear()
            self._ready.notify()
        self._thread.join(timeout=60)

    def _finish(self, job: Job, state: str, event: dict) -> None:
        job.state = state
        self._finished += 1
        job.finished_seq = self._finished
        job.emit(event)

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stop:
                    self._ready.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                job.state = "running"
            self._run(job)

    def _run(self, job: Job) -> None:
        job.emit({"type": "started"})
        outcome = ("done", {"type": "done"})
        try:
            pipe = self.pool.get(job.args)
            images, metadata = render(pipe, job.args, job.job, sampler_options(pipe, job.args), job.edit,
                                      self._progress(job), self._preview(job, pipe))
            for image, seed, path in zip(images, job.job.seeds, job.paths):
                save_png(image, path, {**metadata, "seed": seed})
                job.images.append({"name": path.name, "url": f"/api/images/{path.name}",
                                   "seed": seed, "parameters": read_parameters(path)})
            job.peak_memory = max(pipe.peak_memory.values(), default=0)
            outcome = ("done", {"type": "done", "images": job.images})
        except Cancelled:
            outcome = ("cancelled", {"type": "cancelled"})
        except UsageError as e:
            job.error, job.error_kind = str(e), "usage"
            outcome = ("error", {"type": "error", "message": job.error})
        except Exception as e:  # a job's failure must not end the worker
            print(f"job {job.id} failed: {type(e).__name__}: {e}", file=sys.stderr)
            job.error, job.error_kind = f"{type(e).__name__}: {e}", "internal"
            outcome = ("error", {"type": "error", "message": job.error})
        # here, out of the except blocks, the traceback (and the arrays its frames held) is gone;
        # a finished job keeps no input images (KEEP_JOBS of them stay known)
        pipe = images = None
        job.edit = EditInputs()
        gc.collect()
        if outcome[0] != "done":
            mx.clear_cache()
        job.active_memory = mx.get_active_memory()
        self._finish(job, *outcome)
        self._forget_old()

    def _forget_old(self) -> None:
        """Keep the last KEEP_JOBS finished jobs, and step previews only for the last KEEP_PREVIEWS."""
        finished = [j for j in list(self.jobs.values()) if j.state in FINAL]
        for old in finished[:-KEEP_PREVIEWS]:
            if any("preview" in e for e in old.events):
                old.events = [{k: v for k, v in e.items() if k != "preview"} for e in old.events]
        for old in finished[:-KEEP_JOBS]:
            self.jobs.pop(old.id, None)

    @staticmethod
    def _progress(job: Job):
        """The command's progress callback: where a cancel takes effect (before the next step)."""
        def progress(step: int, total: int, elapsed: float) -> None:
            if job.cancel.is_set():
                raise Cancelled()
            job.last_step = {"step": step, "total": total, "elapsed": round(elapsed, 3)}

        return progress

    @staticmethod
    def _preview(job: Job, pipe):
        """Called after each step's progress: the step's event, with the decoded first image while
        someone is watching."""
        from ..models.pixels import to_pil

        def preview(step: int, latents) -> None:
            event = {"type": "step", **job.last_step}
            if job.watchers:
                event["preview"] = small_png(to_pil(pipe.decode(pipe.preview_latents(latents)[:1]))[0])
            job.emit(event)

        return preview
