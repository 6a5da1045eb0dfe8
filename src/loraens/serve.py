"""`loraens serve RUN`: the ensemble behind a small HTTP server (FastAPI + uvicorn), loaded once.

    POST /predict   {"question": "...", "choices": ["...", "..."]}            one question
                    {"questions": [{"id": "...", "question": ..., "choices": [...]}, ...]}   many
                    optional: "risk" (a calibrated target) or "coverage", "alpha", "set" ("lac"/"aps")
                    -> {"answers": [<the fields of `loraens predict`>], "calibrated": bool}
    GET  /health    status, the run, its decision rules, and counters (requests, questions, forwards)
    GET  /          a one-page UI: ask a question, see every member's probabilities, the ensemble's,
                    the uncertainty scores, the conformal set and the decision

Batching: requests that arrive together are scored in one call of the members' vectorised
forward. A single worker takes the first waiting request, then keeps collecting for up to
`batch_wait_ms` or until `max_batch` questions, and runs them as one batch in a worker thread
while new requests queue up. `/health` counts the forwards, so batching shows as fewer
forwards than requests.

Bad requests (no choices, one choice, more than `MAX_CHOICES`, an over-long question, wrong
types, unknown fields, a body over `MAX_BODY_BYTES`) get a 4xx with a message that names the
field; a request never reaches the model unless it is valid. The server binds 127.0.0.1 by default.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .answer import Answerer, question_from
from .calibration import NO_CALIBRATION, CalibrationError, DecisionSettings
from .data import DataError, MCQAExample
from .member_prompts import Questions, join_questions
from .prompts import PromptError

MAX_CHOICES = 26  # letters A..Z; letter scoring takes at most 10 (checked when the question is encoded)
MAX_QUESTION_CHARS = 4000
MAX_CHOICE_CHARS = 1000
MAX_QUESTIONS = 256  # per request
MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_TOKENS = 2048  # a question's row (prompt + every choice) after encoding

PAGE = Path(__file__).with_name("static") / "serve.html"

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHOICE_CHARS)]


class QuestionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: Annotated[str, StringConstraints(max_length=200)] | None = None
    question: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUESTION_CHARS)]
    choices: Annotated[list[Text], Field(min_length=2, max_length=MAX_CHOICES)]


class PredictIn(BaseModel):
    """One question (`question` + `choices`) or many (`questions`), and optional decision settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: Annotated[str, StringConstraints(max_length=200)] | None = None
    question: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUESTION_CHARS)] | None = None
    choices: Annotated[list[Text], Field(min_length=2, max_length=MAX_CHOICES)] | None = None
    questions: Annotated[list[QuestionIn], Field(min_length=1, max_length=MAX_QUESTIONS)] | None = None
    risk: Annotated[float, Field(gt=0, lt=1)] | None = None
    coverage: Annotated[float, Field(gt=0, le=1)] | None = None
    alpha: Annotated[float, Field(gt=0, lt=1)] | None = None
    set: Literal["lac", "aps"] | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> PredictIn:
        single = self.question is not None or self.choices is not None or self.id is not None
        if self.questions is not None and single:
            raise ValueError("give either `questions` (a list) or one `question` with its `choices`, not both")
        if self.questions is None and (self.question is None or self.choices is None):
            raise ValueError("give `question` (text) and `choices` (a list of at least 2 texts), or `questions`")
        if self.risk is not None and self.coverage is not None:
            raise ValueError("give `risk` or `coverage`, not both")
        return self

    def items(self) -> list[QuestionIn]:
        if self.questions is not None:
            return self.questions
        assert self.question is not None and self.choices is not None
        return [QuestionIn(id=self.id, question=self.question, choices=self.choices)]


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    examples: list[MCQAExample]
    encoded: list[Questions]  # each question, encoded (under every member's prompt) when the request was checked
    settings: DecisionSettings
    future: asyncio.Future


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    questions: int = 0
    batches: int = 0  # scoring calls (each a batch of questions from one or more requests)
    largest_batch: int = 0
    rejected: int = 0


class Batcher:
    """One worker: collects waiting requests into batches of up to `max_batch` questions and scores them."""

    def __init__(self, answerer: Answerer, max_batch: int, wait_s: float, stats: Stats):
        self.answerer = answerer
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.stats = stats
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraens-forward")
        self._held: _Job | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, examples: list[MCQAExample], encoded: list[Questions],
                     settings: DecisionSettings) -> list[dict[str, Any]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(examples, encoded, settings, future))
        return await future

    async def _next(self, timeout: float | None) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        if timeout is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), max(timeout, 0.0)) if timeout > 0 else \
                self.queue.get_nowait()
        except (TimeoutError, asyncio.QueueEmpty):
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            assert first is not None
            jobs, size = [first], len(first.examples)
            deadline = loop.time() + self.wait_s
            while size < self.max_batch:
                job = await self._next(deadline - loop.time())
                if job is None:
                    break
                if size + len(job.examples) > self.max_batch:
                    self._held = job  # it opens the next batch
                    break
                jobs.append(job)
                size += len(job.examples)
            jobs = [j for j in jobs if not j.future.done()]  # a client that went away
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self.pool, self._score, jobs)
            except Exception as err:  # noqa: BLE001 - every waiting request hears of it
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(err)
                continue
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, size)
            for j, records in zip(jobs, results):
                if not j.future.done():
                    j.future.set_result(records)

    def _score(self, jobs: list[_Job]) -> list[list[dict[str, Any]]]:
        examples = [e for j in jobs for e in j.examples]
        preds = self.answerer.score(examples, encoded=join_questions([q for j in jobs for q in j.encoded]))
        out, start = [], 0
        for j in jobs:
            stop = start + len(j.examples)
            # Each request keeps its own choices: narrow the padded choice axis to its widest question.
            width = max(len(e.choices) for e in j.examples)
            part = type(preds)(preds.member_probs[start:stop, :, :width], preds.targets[start:stop],
                               preds.choice_mask[start:stop, :width], preds.ids[start:stop])
            out.append(self.answerer.records(part, j.examples, j.settings))
            start = stop
        return out


def _validation_message(err: RequestValidationError) -> str:
    """"questions[0].choices: List should have at least 2 items after validation, not 1; ..." """
    parts = []
    for e in err.errors():
        where = ""
        for x in e.get("loc", ()):
            if x == "body":
                continue
            where += f"[{x}]" if isinstance(x, int) else (f".{x}" if where else str(x))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts[:5]) + (f" (and {len(parts) - 5} more)" if len(parts) > 5 else "")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything reads it whole."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, {"error": f"the request body has {int(length)} bytes; the limit is "
                                                         f"{self.limit} bytes ({MAX_QUESTION_CHARS} characters per "
                                                         f"question, {MAX_QUESTIONS} questions per request)"})
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BadRequest(f"the request body is over the limit of {self.limit} bytes", 413)
            return message

        return await self.app(scope, limited, send)


async def _send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(answerer: Answerer, max_batch: int = 16, batch_wait_ms: float = 5.0,
               max_tokens: int = MAX_TOKENS) -> Any:
    """The ASGI application (FastAPI inside a body-size limit) around a loaded `Answerer`."""
    if max_batch < 1:
        raise ValueError(f"--max_batch must be at least 1, but got {max_batch}")
    if batch_wait_ms < 0:
        raise ValueError(f"--batch_wait_ms must be at least 0, but got {batch_wait_ms}")
    stats = Stats()
    batcher = Batcher(answerer, max_batch, batch_wait_ms / 1000, stats)
    # Requests are encoded here, on the event loop, while they are checked; the worker thread runs
    # the forward on those encodings and never tokenizes, so one tokenizer is never used by two threads.
    checker = answerer.ensemble.encoder
    page = PAGE.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="loraens", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        stats.rejected += 1
        return JSONResponse(status_code=422, content={"error": _validation_message(err)})

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, err: BadRequest) -> JSONResponse:
        stats.rejected += 1
        return JSONResponse(status_code=err.status, content={"error": str(err)})

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        cal = answerer.calibration
        return {
            "status": "ok",
            "run": str(answerer.run_dir) if answerer.run_dir else None,
            "members": answerer.num_members,
            "model": answerer.ensemble.config.model.name,
            "calibrated": cal is not None,
            "calibration": None if cal is None else {
                "dataset": cal.dataset, "split": cal.split, "n": cal.n, "temperature": cal.temperature,
                "score": cal.score, "delta": cal.delta, "risks": cal.risks,
                "coverages": [c.target for c in cal.coverage], "alphas": cal.alphas,
                "default_risk": cal.default_risk, "default_alpha": cal.default_alpha,
                "default_set": cal.default_set, "created": cal.created},
            "note": None if cal is not None else NO_CALIBRATION,
            "limits": {"max_choices": MAX_CHOICES, "max_question_chars": MAX_QUESTION_CHARS,
                       "max_choice_chars": MAX_CHOICE_CHARS, "max_questions": MAX_QUESTIONS,
                       "max_body_bytes": MAX_BODY_BYTES, "max_tokens": max_tokens},
            "batching": {"max_batch": max_batch, "batch_wait_ms": batch_wait_ms},
            "counters": {"requests": stats.requests, "questions": stats.questions, "batches": stats.batches,
                         "forwards": answerer.forwards, "largest_batch": stats.largest_batch,
                         "rejected": stats.rejected, "uptime_s": round(time.time() - stats.started, 1)},
        }

    @app.post("/predict")
    async def predict(body: PredictIn) -> dict[str, Any]:
        settings = DecisionSettings(risk=body.risk, coverage=body.coverage, alpha=body.alpha, set_method=body.set)
        if answerer.calibration is None and (body.risk, body.coverage, body.alpha, body.set) != (None,) * 4:
            raise BadRequest("this run has no calibration.json, so `risk`, `coverage`, `alpha` and `set` cannot be "
                             "used; run `loraens calibrate` first")
        if answerer.calibration is not None:
            try:
                settings.resolve(answerer.calibration)
            except CalibrationError as err:
                raise BadRequest(str(err)) from None
        examples, encoded = [], []
        for i, q in enumerate(body.items()):
            try:
                ex = question_from(q.model_dump(), i, "questions" if body.questions is not None else "request")
                enc = checker.encode_all([ex])  # one question, under every member's prompt
            except (DataError, PromptError) as err:
                raise BadRequest(str(err)) from None
            if enc[0].num_tokens > max_tokens:  # its longest row, if the members' prompts differ
                raise BadRequest(f"question {i} ({ex.id!r}) is {enc[0].num_tokens} tokens long with its choices; the "
                                 f"limit is {max_tokens}")
            examples.append(ex)
            encoded.append(enc)
        stats.requests += 1
        stats.questions += len(examples)
        answers = await batcher.submit(examples, encoded, settings)
        return {"answers": answers, "calibrated": answerer.calibration is not None}

    return BodyLimit(app, MAX_BODY_BYTES)


def serve(answerer: Answerer, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          batch_wait_ms: float = 5.0, log_level: str = "info") -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(answerer, max_batch, batch_wait_ms), host=host, port=port, log_level=log_level)
