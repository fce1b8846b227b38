"""The HTTP face of the server: OpenAI-compatible routes on FastAPI, streaming as server-sent events."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import ChatTemplateError, end_of_turn_ids, template_of
from ..generation import Run, Step, start_run
from ..prompt_cache import DEFAULT_MAX_MB, PromptCache
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body
from .scheduler import GenerationRequest, QueueFull, Scheduler, SequenceEvent

# Seconds a client is told to wait before retrying when the queue is full.
RETRY_AFTER = 1
# How often a waiting non-streaming request checks whether its client is still there.
DISCONNECT_POLL = 0.25
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _field_error(e: ValueError, default_param: str) -> ApiError:
    """A generation option refused by tokentrail's own checks ("name: reason") as a 400 naming the field."""
    text = str(e)
    name, sep, _ = text.partition(":")
    param = name.strip() if sep and name.strip().replace("_", "").replace(".", "").isalnum() else default_param
    return ApiError(400, text, param=param)


class Mailbox:
    """Carries events from the engine thread to the requests' asyncio queues.

    Every step reports one event per running sequence; handing each over
    with its own ``call_soon_threadsafe`` would wake the event loop (a write
    to its self-pipe) once per sequence per step. Events posted while a
    delivery is pending join it, so a step's events arrive in one wake-up.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, SequenceEvent]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, event: SequenceEvent) -> None:
        """Called from the engine thread."""
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


class Server:
    """A model, its scheduler and what the routes need to answer."""

    def __init__(self, model, model_name: str, parallel: int = 4, max_queue: int = 64, prefill_chunk: int = 256,
                 timeout: float | None = 600.0, chat_template: str | None = None,
                 prompt_cache_mb: float = DEFAULT_MAX_MB):
        self.model = model
        self.model_name = model_name
        self.timeout = timeout
        self.created = int(time.time())
        self.prompt_cache = PromptCache(model, max_mb=prompt_cache_mb) if prompt_cache_mb > 0 else None
        self.scheduler = Scheduler(model, parallel=parallel, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                   prompt_cache=self.prompt_cache)
        self.mailbox: Mailbox | None = None  # made on the event loop, at the first request
        self.chat_template = None
        if model.tokenizer is not None and (chat_template is not None
                                            or getattr(model.tokenizer, "chat_template", None) is not None):
            self.chat_template = template_of(model, chat_template)

    # -- building runs ---------------------------------------------------------
    def _options(self, req: SamplingFields, top_n: int, logprobs: bool) -> dict:
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ApiError(400, f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias")
            if not -100.0 <= value <= 100.0:
                raise ApiError(400, f"logit_bias: biases must lie in [-100, 100], got {value}", param="logit_bias")
            bias[int(key)] = value
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop: at most 4 stop strings, got {len(stops)}", param="stop")
        return dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                    repetition_penalty=req.repetition_penalty, logit_bias=bias, stop=stops,
                    logprobs=logprobs, top_n=top_n)

    def _runs(self, prompts: Sequence, req: SamplingFields, max_tokens: int, options: dict, param: str,
              eos_ids=None) -> list[Run]:
        """n runs per prompt, choice i seeded seed + i; every option checked before anything runs."""
        runs = []
        limit = self.model.context_limit
        for prompt in prompts:
            for i in range(req.n):
                seed = None if req.seed is None else req.seed + len(runs)
                try:
                    run = start_run(self.model, prompt, max_tokens, seed=seed, eos_ids=eos_ids, **options)
                except ValueError as e:
                    raise _field_error(e, param) from None
                if len(run.prompt_ids) > limit:
                    raise ApiError(400, f"{param}: {len(run.prompt_ids)} tokens do not fit the context of {limit}",
                                   param=param)
                runs.append(run)
        return runs

    def _submit(self, runs: list[Run], journey_top: int, choices: int = 1, cache_prompt: bool = True):
        """Queue the runs (`choices` consecutive runs per prompt); their events come on the returned queue.
        `cache_prompt=False`: the prompts neither reuse nor leave anything in the prompt cache."""
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = Mailbox(loop)
        mailbox = self.mailbox
        queue: asyncio.Queue[SequenceEvent] = asyncio.Queue()

        def emit(event: SequenceEvent) -> None:
            mailbox.post(queue, event)

        deadline = time.monotonic() + self.timeout if self.timeout else None
        seqs = [GenerationRequest(run, i, emit, journey_top=journey_top, deadline=deadline, cache_prompt=cache_prompt)
                for i, run in enumerate(runs)]
        if choices > 1 and not journey_top:
            # The prompt is prefilled once per prompt; its other choices start from a copy of that cache.
            # (A journey needs the prompt's last position captured for each choice: those run it themselves.)
            for first in range(0, len(seqs), choices):
                seqs[first].followers = seqs[first + 1: first + choices]
        try:
            self.scheduler.submit(seqs)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER)}) from None
        return queue, seqs

    # -- answering -------------------------------------------------------------------
    async def collect(self, request: Request, runs: list[Run], journey_top: int, choices: int = 1,
                      cache_prompt: bool = True):
        """Every choice's steps (and journeys), or None when the client went away."""
        queue, seqs = self._submit(runs, journey_top, choices, cache_prompt)
        steps: list[list[Step]] = [[] for _ in runs]
        journeys: list[list[dict]] = [[] for _ in runs]
        remaining = len(runs)
        checked = time.monotonic()
        try:
            while remaining:
                # Events may keep coming for long: look at the connection every DISCONNECT_POLL seconds.
                if time.monotonic() - checked >= DISCONNECT_POLL:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return None
                try:
                    ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    continue
                if ev.kind == "error":
                    raise ApiError(ev.code, ev.error, kind="server_error" if ev.code >= 500 else
                                   ("timeout_error" if ev.code == 408 else "invalid_request_error"))
                steps[ev.index].append(ev.step)
                if ev.journey is not None:
                    journeys[ev.index].append(self.journey_entry(ev.step, ev.journey))
                if ev.step.finish_reason is not None:
                    remaining -= 1
        finally:
            for s in seqs:  # a no-op for finished ones; frees the slots of the others
                s.cancel()
        return steps, journeys

    async def events(self, runs: list[Run], journey_top: int, choices: int = 1,
                     cache_prompt: bool = True) -> AsyncIterator[SequenceEvent]:
        """Events of every choice as they come; leaving early cancels the sequences."""
        queue, seqs = self._submit(runs, journey_top, choices, cache_prompt)
        remaining = len(runs)
        try:
            while remaining:
                ev = await queue.get()
                yield ev
                if ev.kind == "error":
                    return
                if ev.step.finish_reason is not None:
                    remaining -= 1
        finally:
            for s in seqs:
                s.cancel()

    def journey_entry(self, step: Step, journey: dict) -> dict:
        def alternatives(alts):
            return [{"id": a.token, "token": a.text, "prob": a.prob, "logprob": a.logprob} for a in alts]

        return {"index": step.index, "id": step.token, "token": self.display(step.token), "text": step.text,
                "logprob": step.logprob, "rank": step.rank, "top_before_sampling": alternatives(step.top_model),
                "top_after_sampling": alternatives(step.top_sampled), **journey}

    def display(self, token: int) -> str:
        tok = self.model.tokenizer
        return tok.display(token) if tok is not None else f"<{token}>"


def _usage(prompt_tokens: int, completion_tokens: int, runs: Sequence[Run], choices: int) -> dict:
    """OpenAI's usage counts; `prompt_tokens_details.cached_tokens` are the prompt positions taken from
    the prompt cache (each prompt's first choice runs it; the others copy that)."""
    cached = sum(run.timings.cached_tokens for run in runs[::choices])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(model, model_name: str = "tokentrail", parallel: int = 4, max_queue: int = 64,
               prefill_chunk: int = 256, timeout: float | None = 600.0, chat_template: str | None = None,
               prompt_cache_mb: float = DEFAULT_MAX_MB) -> FastAPI:
    """The FastAPI application serving `model` (its engine thread runs while the app does)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client import CONTENT_TYPE_LATEST

    server = Server(model, model_name, parallel=parallel, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    timeout=timeout, chat_template=chat_template, prompt_cache_mb=prompt_cache_mb)
    sched = server.scheduler

    registry = CollectorRegistry()
    stats = sched.stats
    gauges = {  # name: (help, how to read it)
        "queue_depth": ("Sequences waiting for a slot", lambda: sched.queue_depth),
        "active_sequences": ("Sequences in the running batch", lambda: sched.active),
        "tokens_per_second": ("Generated tokens per second over the last 10 s", stats.tokens_per_second),
        "generated_tokens": ("Tokens generated since the start", lambda: stats.generated),
        "prompt_tokens": ("Prompt tokens prefilled since the start", lambda: stats.prompt_tokens),
        "prompt_cached_tokens": ("Prompt tokens not prefilled: taken from the prompt cache or copied from a "
                                 "running sequence",
                                 lambda: stats.cached_tokens),
        "prompt_cache_bytes": ("Bytes of KV caches the prompt cache holds",
                               lambda: server.prompt_cache.stats.bytes if server.prompt_cache else 0),
        "cancelled_sequences": ("Sequences whose client went away before the end", lambda: stats.cancelled),
        "timed_out_sequences": ("Sequences stopped by the per-request time limit", lambda: stats.timed_out),
        "forked_sequences": ("Choices started from a copy of another choice's prefilled prompt",
                             lambda: stats.forked),
        "steps": ("Steps of the engine (each one forward pass of the running batch)", lambda: stats.steps),
        "step_tokens": ("Tokens run through the model by the steps (prompt chunks and decode tokens)",
                        lambda: stats.rows),
        "forward_seconds": ("Seconds the steps spent in the forward pass", lambda: stats.forward_seconds),
        "step_seconds": ("Seconds the steps took in all (forward pass, sampling, events)",
                         lambda: stats.step_seconds),
    }
    for name, (text, read) in gauges.items():
        Gauge(f"tokentrail_{name}", text, registry=registry).set_function(read)
    ttft = Histogram("tokentrail_time_to_first_token_seconds", "From arrival to the first generated token",
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
    requests_total = Counter("tokentrail_requests", "Requests answered, by route and status",
                             ["route", "status"], registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start()
        try:
            yield
        finally:
            sched.stop()

    app = FastAPI(title="tokentrail", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        requests_total.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(error_body(e.message, e.kind, e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        # Unknown routes and methods answer in OpenAI's shape too.
        requests_total.labels(request.url.path, str(e.status_code)).inc()
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}",
                                       "not_found_error" if e.status_code == 404 else "invalid_request_error"),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            message, param = f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
        elif kind == "missing" and not loc:
            message, param = "the body must be a JSON object", None
        else:
            # Union members add their type name to the location; keep only the request's own path.
            path = [p for p in loc if not (p[:1].islower() and ("[" in p or p in ("str", "int", "list", "dict")))]
            param = ".".join(path) or None
            what = "unknown field" if kind == "extra_forbidden" else err["msg"]
            message = f"{param}: {what}" if param else what
        requests_total.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(message, param=param), status_code=400)

    async def answer(request: Request, route: str, req, runs: list[Run], journey_top: int, prompt_tokens: int,
                     rid: str, chunk_object: str, final_object: str, stream_choices, final_choice):
        """The response to a generation request: a stream of chunks, or one body when all choices are done."""
        base = {"id": rid, "object": chunk_object, "created": int(time.time()), "model": server.model_name}
        if req.stream:
            async def stream():
                completion_tokens = 0
                async for ev in server.events(runs, journey_top, req.n, req.cache_prompt):
                    if ev.kind == "error":
                        yield _sse(error_body(ev.error, "server_error" if ev.code >= 500 else "invalid_request_error"))
                        break
                    completion_tokens += 1
                    for c in stream_choices(ev):
                        yield _sse({**base, "choices": [c]})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens, runs, req.n)})
                yield "data: [DONE]\n\n"
                requests_total.labels(route, "200").inc()

            return StreamingResponse(stream(), media_type="text/event-stream")
        got = await server.collect(request, runs, journey_top, req.n, req.cache_prompt)
        if got is None:  # the client went away; nobody reads this
            requests_total.labels(route, "499").inc()
            return PlainTextResponse("", status_code=499)
        steps, journeys = got
        requests_total.labels(route, "200").inc()
        return {**base, "object": final_object,
                "choices": [final_choice(i, st, journeys[i] if journey_top else None) for i, st in enumerate(steps)],
                "usage": _usage(prompt_tokens, sum(len(st) for st in steps), runs, req.n)}

    @app.get("/health")
    async def health():
        return {"status": "ok", "active_sequences": sched.active, "queue_depth": sched.queue_depth}

    @app.get("/metrics")
    async def metrics():
        for seconds in sched.stats.drain_ttft():
            ttft.observe(seconds)
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "tokentrail",
                                            "context_length": server.model.context_limit}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if server.model.tokenizer is None and (isinstance(req.prompt, str) or
                                               (req.prompt and isinstance(req.prompt[0], str))):
            raise ApiError(400, "prompt: this model has no tokenizer; send token ids", param="prompt")
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise ApiError(400, "prompt: is empty", param="prompt")
        top_n = req.logprobs or 0
        journey_top = req.tokentrail.top if req.tokentrail and req.tokentrail.journey else 0
        options = server._options(req, max(top_n, journey_top), req.logprobs is not None or bool(journey_top))
        runs = server._runs(prompts, req, req.max_tokens or 16, options, "prompt")
        prompt_tokens = sum(len(r.prompt_ids) for r in runs[:: req.n])
        rid = f"cmpl-{uuid.uuid4().hex}"

        def choice(index: int, text: str, finish: str | None, steps: list[Step], journeys: list[dict] | None,
                   offset: int) -> dict:
            c = {"index": index, "text": text, "finish_reason": FINISH_REASONS.get(finish) if finish else None,
                 "logprobs": None}
            if req.logprobs is not None:
                offsets, at = [], offset
                for s in steps:
                    offsets.append(at)
                    at += len(s.text)
                c["logprobs"] = {"tokens": [server.display(s.token) for s in steps],
                                 "token_logprobs": [s.logprob for s in steps],
                                 "top_logprobs": [{a.text: a.logprob for a in s.top_model[: req.logprobs]}
                                                  for s in steps],
                                 "text_offset": offsets}
            if journeys is not None:
                c["tokentrail"] = {"journey": journeys}
            return c

        offsets = [0] * len(runs)  # where each choice's next text starts

        def stream_choices(ev: SequenceEvent) -> list[dict]:
            s = ev.step
            journeys = [server.journey_entry(s, ev.journey)] if ev.journey is not None else None
            c = choice(ev.index, s.text, s.finish_reason, [s], journeys, offsets[ev.index])
            offsets[ev.index] += len(s.text)
            return [c]

        def final_choice(i: int, steps: list[Step], journeys: list[dict] | None) -> dict:
            return choice(i, "".join(s.text for s in steps), steps[-1].finish_reason, steps, journeys, 0)

        return await answer(request, "/v1/completions", req, runs, journey_top, prompt_tokens, rid,
                            "text_completion", "text_completion", stream_choices, final_choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if server.chat_template is None:
            raise ApiError(400, "messages: this model has no chat template; start the server with --chat-template FILE, "
                                "or use /v1/completions", param="messages")
        messages = []
        for m in req.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                d["content"] = "".join(part.text for part in m.content)
            messages.append(d)
        try:
            prompt = server.chat_template.render(messages, tools=req.tools, documents=req.documents,
                                                 add_generation_prompt=True, **(req.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        except ValueError as e:
            raise _field_error(e, "messages") from None
        ids = server.model.tokenizer.encode(prompt, special=False)
        if not ids:
            raise ApiError(400, "messages: the chat template rendered an empty prompt", param="messages")
        if len(ids) > server.model.context_limit:
            raise ApiError(400, f"messages: the conversation takes {len(ids)} tokens, more than the context of "
                                f"{server.model.context_limit}", param="messages")
        top_n = (req.top_logprobs or 0) if req.logprobs else 0
        journey_top = req.tokentrail.top if req.tokentrail and req.tokentrail.journey else 0
        options = server._options(req, max(top_n, journey_top), req.logprobs or bool(journey_top))
        max_tokens = req.max_completion_tokens or req.max_tokens or server.model.context_limit
        runs = server._runs([ids], req, max_tokens, options, "messages",
                            eos_ids=end_of_turn_ids(server.model.tokenizer, server.chat_template))
        prompt_tokens = len(ids)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def logprobs_of(steps: list[Step]) -> dict | None:
            if not req.logprobs:
                return None

            def entry(text, logprob, alts=None):
                e = {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
                if alts is not None:
                    e["top_logprobs"] = [entry(a.text, a.logprob) for a in alts[:top_n]]
                return e

            return {"content": [entry(server.display(s.token), s.logprob, s.top_model) for s in steps]}

        started: set[int] = set()

        def stream_choices(ev: SequenceEvent) -> list[dict]:
            s, out = ev.step, []
            if ev.index not in started:  # each choice opens with the assistant's role
                started.add(ev.index)
                out.append({"index": ev.index, "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None, "logprobs": None})
            c = {"index": ev.index, "delta": {"content": s.text} if s.text else {},
                 "finish_reason": FINISH_REASONS.get(s.finish_reason) if s.finish_reason else None,
                 "logprobs": logprobs_of([s])}
            if ev.journey is not None:
                c["tokentrail"] = {"journey": [server.journey_entry(s, ev.journey)]}
            return out + [c]

        def final_choice(i: int, steps: list[Step], journeys: list[dict] | None) -> dict:
            c = {"index": i, "message": {"role": "assistant", "content": "".join(s.text for s in steps)},
                 "finish_reason": FINISH_REASONS[steps[-1].finish_reason], "logprobs": logprobs_of(steps)}
            if journeys is not None:
                c["tokentrail"] = {"journey": journeys}
            return c

        return await answer(request, "/v1/chat/completions", req, runs, journey_top, prompt_tokens, rid,
                            "chat.completion.chunk", "chat.completion", stream_choices, final_choice)

    return app


def serve(model, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, **options), host=host, port=port, log_level="info")
