"""The HTTP API: OpenAI's fine-tuning, files, models and completions endpoints, so the official SDK works, and
classifications from a served classifier run (serve/classification.py).

Every request carries `Authorization: Bearer tsk_...`; the key names a project and a scope (read < write <
admin). Objects of other projects answer 404, as if they did not exist. Every state-changing call is written
to the hash-chained audit log with the key that made it.
"""

from __future__ import annotations

import io
import json
import re
import threading
from contextlib import closing
from typing import Any, Callable, Generator, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.security import apikeys
from tunesmith.security.apikeys import Scope
from tunesmith.serve import classification, inference, shapes
from tunesmith.serve.access import Caller, needs
from tunesmith.serve.bodies import json_body
from tunesmith.serve.request import RequestError
from tunesmith.serve.service import Service
from tunesmith.serve.shapes import ApiError, not_found
from tunesmith.serve.store import UnknownCursor
from tunesmith.serve.uploads import read_form

MAX_PAGE = 100
DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streamed reply checks that its client is still there
DRAIN_SECONDS = 3  # SIGTERM: every reply being generated ends within this (as at max_tokens)
SHUTDOWN_SECONDS = 7  # SIGTERM: connections still open after this are closed; the process exits within 10 s


def page_args(limit: int, after: str | None) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"limit={limit}: must be 1 to {MAX_PAGE}", "limit")
    return limit


def create_app(
    service: Service,
    pool: inference.AdapterPool | None = None,
    classifiers: classification.ClassifierPool | None = None,
) -> FastAPI:
    # No unauthenticated schema or docs page: /openapi.json is served below, to any valid key
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.pool = pool = pool or inference.AdapterPool()
    app.state.classifiers = classifiers = classifiers or classification.ClassifierPool()
    store = service.store

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(UnknownCursor)
    async def unknown_cursor(_: Request, error: UnknownCursor) -> JSONResponse:
        return JSONResponse(shapes.unknown_cursor(error.after, error.kind).body(), status_code=400)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return JSONResponse(
            ApiError(400, f"{where}: {first.get('msg', 'invalid request')}", where).body(), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return JSONResponse(
            ApiError(error.status_code, str(error.detail), None, code).body(), status_code=error.status_code
        )

    @app.exception_handler(Exception)  # Starlette still re-raises it afterwards, so the server logs the traceback
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse(
            ApiError(
                500,
                "The server had an error while processing your request; its log has the details",
                type="server_error",
            ).body(),
            status_code=500,
        )

    # files
    @app.post("/v1/files")
    async def upload_file(request: Request, caller: Caller = needs(Scope.WRITE)) -> dict:
        parts = await read_form(
            request.headers.get("content-type", ""),
            request.stream(),
            service.settings.max_upload_bytes,
            request.headers.get("content-length", ""),
        )
        if "file" not in parts or parts["file"].filename is None:
            raise ApiError(400, "Missing required parameter: 'file'.", "file", "missing_required_parameter")
        if "purpose" not in parts:
            raise ApiError(400, "Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
        upload = parts["file"]
        row = service.upload(
            caller.project,
            upload.filename,
            parts["purpose"].data.decode("utf-8", "replace"),
            io.BytesIO(upload.data),
            actor=caller.key_id,
        )
        return shapes.file_object(row)

    @app.get("/v1/files")
    def list_files(
        purpose: str | None = None, limit: int = 100, after: str | None = None, caller: Caller = needs(Scope.READ)
    ) -> dict:
        rows = store.files(caller.project, purpose, after, page_args(limit, after) + 1)
        return shapes.page(rows, limit, shapes.file_object)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, caller: Caller = needs(Scope.READ)) -> dict:
        return shapes.file_object(service.file(caller.project, file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, caller: Caller = needs(Scope.READ)) -> Response:
        from tunesmith.serve.service import RESULTS_PURPOSE

        row = service.file(caller.project, file_id)
        if row["purpose"] != RESULTS_PURPOSE and not caller.scope.allows(Scope.WRITE):
            # OpenAI: training files cannot be downloaded with a read key; a job's results can
            raise ApiError(
                403,
                f"File {file_id} is training data (purpose '{row['purpose']}'): downloading it needs "
                f"a 'write' key; a 'read' key reads only result files. Use a key made with "
                f"`tunesmith keys create --scope write`",
                None,
                "insufficient_scope",
                type="permission_error",
            )
        return StreamingResponse(service.blobs.chunks(f"files/{row['id']}"), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, caller: Caller = needs(Scope.WRITE)) -> dict:
        return service.erase_file(caller.project, file_id, actor=caller.key_id)

    # fine-tuning jobs
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request, caller: Caller = needs(Scope.WRITE)) -> dict:
        job = service.create_job(caller.project, await json_body(request), actor=caller.key_id)
        threading.Thread(target=service.validate_job, args=(job,), daemon=True).start()
        return shapes.job_object(job)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(limit: int = 20, after: str | None = None, caller: Caller = needs(Scope.READ)) -> dict:
        return shapes.page(store.jobs(caller.project, after, page_args(limit, after) + 1), limit, shapes.job_object)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str, caller: Caller = needs(Scope.READ)) -> dict:
        return shapes.job_object(service.job(caller.project, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, caller: Caller = needs(Scope.WRITE)) -> dict:
        status = shapes.job_status(service.job(caller.project, job_id))
        if status in ("succeeded", "failed", "cancelled"):
            raise ApiError(
                400, f"Job {job_id} has already {status}: it cannot be cancelled", "job_id", "job_not_cancellable"
            )
        with service.audited(caller.project, caller.key_id, "job.cancel", [job_id]):
            job = store.request_cancel(caller.project, job_id)
        if status == "paused":  # no worker holds it: its sealed run and checkpoints go now
            service.erase_run(job_id)
        return shapes.job_object(job)

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str, caller: Caller = needs(Scope.WRITE)) -> dict:
        job = service.job(caller.project, job_id)
        if shapes.job_status(job) not in ("queued", "running"):
            raise ApiError(
                400,
                f"Job {job_id} is {shapes.job_status(job)}: only a queued or running job can be paused",
                "job_id",
                "job_not_pausable",
            )
        with service.audited(caller.project, caller.key_id, "job.pause", [job_id]):
            job = store.request_pause(caller.project, job_id)
        return shapes.job_object(job)

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str, caller: Caller = needs(Scope.WRITE)) -> dict:
        job = service.job(caller.project, job_id)
        if job["status"] != "paused":
            raise ApiError(
                400,
                f"Job {job_id} is {shapes.job_status(job)}, not paused: only a paused job can be resumed",
                "job_id",
                "job_not_resumable",
            )
        with service.audited(caller.project, caller.key_id, "job.resume", [job_id]):
            store.resume(caller.project, job_id)
        store.add_event(job_id, "Fine-tuning job resumed: queued for a worker")
        return shapes.job_object(service.job(caller.project, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, limit: int = 20, after: str | None = None, caller: Caller = needs(Scope.READ)) -> dict:
        service.job(caller.project, job_id)
        rows = store.events(job_id, after, page_args(limit, after) + 1)
        return shapes.page(rows, limit, shapes.event_object)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(
        job_id: str, limit: int = 10, after: str | None = None, caller: Caller = needs(Scope.READ)
    ) -> dict:
        job = service.job(caller.project, job_id)
        name = job["fine_tuned_model"] or f"ft:{job['model']}:{job['suffix'] or 'tunesmith'}:{job['id']}"
        rows = store.checkpoints(job_id, after, page_args(limit, after) + 1)
        return shapes.page(rows, limit, lambda row: shapes.checkpoint_object(row, name))

    # models
    @app.get("/v1/models")
    def list_models(caller: Caller = needs(Scope.READ)) -> dict:
        bases = [shapes.model_object(name, 0, "tunesmith") for name in sorted(service.base_models)]
        tuned = [
            shapes.model_object(row["id"], row["created_at"], caller.project) for row in store.models(caller.project)
        ]
        return {"object": "list", "data": bases + tuned}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str, caller: Caller = needs(Scope.READ)) -> dict:
        if model_id in service.base_models:
            return shapes.model_object(model_id, 0, "tunesmith")
        row = store.model(caller.project, model_id)
        if row is None:
            raise not_found("model", model_id, "model")
        return shapes.model_object(row["id"], row["created_at"], caller.project)

    @app.delete("/v1/models/{model_id:path}")
    def delete_model(model_id: str, caller: Caller = needs(Scope.WRITE)) -> dict:
        if model_id in service.base_models:
            raise ApiError(
                403,
                f"{model_id} is a base model: only fine-tuned models can be deleted",
                "model",
                type="permission_error",
            )
        return service.delete_model(caller.project, model_id, actor=caller.key_id)

    # inference
    def target(caller: Caller, body: dict[str, Any]) -> tuple[str, str | None, Any]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "Missing required parameter: 'model'.", "model", "missing_required_parameter")
        if model in service.base_models:
            run = service.run_model(service.base_models[model])  # `serve --model NAME=RUN_DIR`
            if run is None:
                return service.base_models[model], None, None
            if run["classifier"] is not None:
                raise ApiError(
                    400,
                    f"The model '{model}' is a classifier (a run trained with method: classify): it names a "
                    f"label and writes no text; fix: use /v1/classifications",
                    "model",
                    "model_is_classifier",
                )
            messages = body.get("messages")
            if (
                run["system_prompt"] is not None
                and isinstance(messages, list)
                and messages
                and isinstance(messages[0], dict)
                and messages[0].get("role") not in ("system", "developer")
            ):
                body["messages"] = [{"role": "system", "content": run["system_prompt"]}, *messages]  # as `chat` does
            return run["base"], run["adapter"], run["files"]
        missing = ApiError(
            404, f"The model '{model}' does not exist or you do not have access to it.", "model", "model_not_found"
        )
        checkpoint = re.fullmatch(r"ft:.+:(ftjob-[^:]+):ckpt-step-(\d+)", model)  # checkpoint_object's names
        if checkpoint:
            job, step = store.job(caller.project, checkpoint[1]), int(checkpoint[2])
            tuned = job and (job["fine_tuned_model"] or f"ft:{job['model']}:{job['suffix'] or 'tunesmith'}:{job['id']}")
            if (
                not job
                or model != f"{tuned}:ckpt-step-{step}"
                or not any(row["step"] == step for row in store.checkpoints(job["id"], None, 1 << 20))
            ):
                raise missing
            return service.base_models[job["model"]], model, lambda: service.adapter_files(job["id"], step=step)
        row = store.model(caller.project, model)
        if row is None:
            raise missing
        return service.base_models[row["base"]], row["id"], lambda: service.adapter_files(row["job_id"])

    async def answer(request: Request, body: dict[str, Any], whole, chunks, caller: Caller) -> Any:
        """The reply, made in a thread. A stream stops when its client leaves (the response closes it); a whole
        reply's client is polled while it is made, and its generation stops when that client has gone."""

        def stream() -> Any:
            base, adapter, loader = target(caller, body)
            return ClosingStreamingResponse(
                sse(chunks(pool, base, adapter, loader, body)), media_type="text/event-stream"
            )

        if body.get("stream"):
            return await _in_thread(stream)

        def reply(gone: threading.Event) -> Any:
            base, adapter, loader = target(caller, body)
            return whole(pool, base, adapter, loader, body, cancel=gone)

        return await while_connected(request, reply)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, caller: Caller = needs(Scope.READ)) -> Any:
        body = await json_body(request)
        return await answer(request, body, inference.chat_completion, inference.chat_completion_chunks, caller)

    @app.post("/v1/completions")
    async def completions(request: Request, caller: Caller = needs(Scope.READ)) -> Any:
        body = await json_body(request)
        return await answer(request, body, inference.completion, inference.completion_chunks, caller)

    def classifier_run(caller: Caller, body: dict[str, Any]) -> str:
        """The run directory of the classifier `body` names. A model the caller cannot see answers as for chat (a
        404); one that exists but generates text is a 400."""
        model = body.get("model")
        if isinstance(model, str) and model in service.base_models:
            run = service.run_model(service.base_models[model])
            if run is not None and run["classifier"] is not None:
                return run["classifier"]
        target(caller, {"model": model})
        raise ApiError(
            400,
            f"The model '{model}' is not a classifier: it writes text, and answers /v1/chat/completions; fix: name a "
            f"run trained with method: classify, served as `tunesmith serve --model NAME=RUN`",
            "model",
            "model_not_classifier",
        )

    @app.post("/v1/classifications")
    async def classifications(request: Request, caller: Caller = needs(Scope.READ)) -> dict:
        body = await json_body(request)

        def reply(gone: threading.Event) -> dict:
            return classification.classifications(classifiers, classifier_run(caller, body), body, cancel=gone)

        return await while_connected(request, reply)

    # administration (admin scope): the project's keys and the audit trail
    @app.get("/v1/keys")
    def list_keys(caller: Caller = needs(Scope.ADMIN)) -> dict:
        return {"object": "list", "data": [key_object(row) for row in store.keys(caller.project)]}

    @app.post("/v1/keys")
    async def create_key(request: Request, caller: Caller = needs(Scope.ADMIN)) -> dict:
        body = await json_body(request)
        try:
            scope = Scope.parse(str(body.get("scope", "read")))
        except Exception:
            raise ApiError(400, f"scope {body.get('scope')!r}: use read, write or admin", "scope") from None
        key = apikeys.new_key()
        with service.audited(caller.project, caller.key_id, "key.create", [key.key_id], scope=scope.value):
            store.add_key(key.key_id, caller.project, scope.value, key.hash, str(body.get("name", ""))[:200])
        return {**key_object(store.key(key.key_id)), "key": key.secret}

    @app.delete("/v1/keys/{key_id}")
    def revoke_key(key_id: str, caller: Caller = needs(Scope.ADMIN)) -> dict:
        row = store.key(key_id)
        if row is None or row["project_id"] != caller.project:
            raise not_found("key", key_id)
        with service.audited(caller.project, caller.key_id, "key.revoke", [key_id]):
            store.revoke_key(key_id)
        return {"id": key_id, "object": "key", "deleted": True}

    @app.get("/v1/audit")
    def audit(limit: int = 100, caller: Caller = needs(Scope.ADMIN)) -> dict:
        check = service.verify_audit()  # the chain, and that it reaches the head the store recorded
        records = [record.to_dict() for record in service.audit_log.records() if record.project == caller.project]
        return {
            "object": "list",
            "verified": bool(check),
            "problem": None if check else str(check),
            "data": records[-page_args(limit, None) :],
        }

    @app.on_event("startup")
    def revalidate() -> None:  # jobs whose validation a stopped server never finished
        for job in store.jobs(None, limit=1000):
            if job["status"] == "validating_files":
                threading.Thread(target=service.validate_job, args=(job,), daemon=True).start()

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_: Caller = needs(Scope.READ)) -> dict:
        return app.openapi()

    from tunesmith.serve import dashboard, graders

    app.include_router(graders.router)
    app.include_router(dashboard.router)
    return app


def key_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "key",
        "scope": row["scope"],
        "name": row["name"],
        "created_at": row["created_at"],
        "revoked_at": row["revoked_at"],
    }


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse over a sync iterator that closes it however the response ends.

    Starlette stops iterating when the client leaves but never closes the iterator, so its `finally` blocks
    (for a completion stream: ending the generation and releasing the base model's lock) would wait for a
    garbage collection. Closing runs in a thread (it waits for the generation to stop at its next token) and
    is shielded from the cancellation that a disconnect brings. Starlette's thread calls are not abandoned on
    cancellation, so the iterator is never running when it is closed.
    """

    def __init__(self, content: Generator[bytes, None, None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.sync_iterator = content

    async def __call__(self, scope, receive, send) -> None:
        import anyio

        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await anyio.to_thread.run_sync(self.sync_iterator.close)


def sse(chunks: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    """Server-sent events as OpenAI streams them: one `data:` line per chunk, then `data: [DONE]`.
    Closing this closes `chunks`."""
    with closing(chunks):
        try:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        except Exception as error:  # after the headers went out, an error can only travel as an event
            yield f"data: {json.dumps(ApiError(500, str(error), type='server_error').body())}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def _in_thread(function, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


async def while_connected(request: Request, work: Callable[[threading.Event], Any]) -> Any:
    """`work(gone)`, run in a thread while the request's client is polled: `gone` is set once it has left, so the
    work can stop early (generation at its next token, classification at its next batch)."""
    import asyncio

    gone = threading.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        gone.set()

    watcher = asyncio.ensure_future(watch())
    try:
        return await _in_thread(work, gone)
    finally:
        watcher.cancel()


class DrainingServer(uvicorn.Server):
    """uvicorn's server for `tunesmith serve`. Its exit signal (SIGTERM, Ctrl-C) first winds generation up: every
    reply in flight or queued ends within DRAIN_SECONDS, as if it had reached max_tokens, and the worker takes
    no new job. uvicorn then stops accepting, waits for the open requests (at most SHUTDOWN_SECONDS) and exits."""

    def __init__(self, app: FastAPI, pool: inference.AdapterPool, worker: Any = None, **options: Any):
        super().__init__(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_SECONDS, **options)
        )
        self.pool, self.worker = pool, worker

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.pool.close(DRAIN_SECONDS)
        if self.worker is not None:
            self.worker.stop()
        super().handle_exit(sig, frame)
