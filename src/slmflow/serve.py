"""`slmflow serve`: a published model folder behind a small HTTP endpoint (FastAPI + uvicorn, which
Prefect already brings).

Run as:
    slmflow serve --model runs/default/model [--host 127.0.0.1] [--port 8000]

    GET  /health      {"status": "ok", "labels": [...], "model": "...",
                       "adapters": {name: [labels], ...}, "default_adapter": name}
    POST /classify    {"text": "I can't stop smiling"}            -> one prediction
                      {"texts": ["one", "two"], "constrained": false} -> {"predictions": [...]}
                      {"text": "I was charged twice", "adapter": "tickets"}

A prediction: `label`, `confidence`, `probabilities`, `answer` (`slmflow.classifier`). The model
is loaded once; requests are served one at a time on it (the classifier's lock; a list is
batched as the evaluation batches), so concurrent clients wait their turn rather than share a
generator. A folder with adapter files (`export.adapters: separate`, `slmflow bundle`) answers
each request with its `adapter` (default: the folder's default), in that adapter's label set,
and says which (`adapter` beside the prediction, or the list); the adapter is switched under
the same lock as the generation, so requests for different adapters may interleave freely.
`adapters` is {} and `default_adapter` null for a merged model. A bad request (an unknown
adapter too: the message names the folder's) is answered 422 (400 for JSON that does not
parse) with a message in `detail`. Binds 127.0.0.1 unless told otherwise.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.
from typing import Any

MAX_TEXTS = 1024  # per request: a bigger list is refused (use `slmflow predict --input`)


def create_app(clf: Any):
    """The FastAPI app around a loaded `Classifier`."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    from slmflow.classifier import InputError, UnknownAdapterError

    Text = str | dict[str, Any]

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: Text | None = Field(None, description="one text (or an object of the text columns)")
        texts: list[Text] | None = Field(None, description=f"a list of up to {MAX_TEXTS} texts")
        constrained: bool | None = Field(None, description="default true: answers in the label set")
        adapter: str | None = Field(None, description="a folder with adapter files: the one to "
                                    "answer with (default: the folder's default; GET /health)")

    app = FastAPI(title="slmflow classifier", description=__doc__.split("\n")[0])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "the body is not valid JSON"}, status_code=400)
        where = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}"
                          for e in errors[:5])
        return JSONResponse({"detail": f"bad request: {where}; send {{\"text\": \"...\"}} or "
                             "{\"texts\": [\"...\", ...]}"}, status_code=422)

    @app.get("/health")
    def health() -> dict[str, Any]:  # labels: what a request naming no adapter answers with
        return {"status": "ok", "labels": clf.task(clf.default_adapter).labels,
                "model": str(clf.path),
                "adapters": {name: clf.task(name).labels for name in clf.adapters},
                "default_adapter": clf.default_adapter}

    @app.post("/classify")
    def classify(req: ClassifyRequest) -> dict[str, Any]:  # a worker thread; the model's lock
        if (req.text is None) == (req.texts is None):
            raise HTTPException(422, "send exactly one of \"text\" (one text) or \"texts\" (a list)")
        items = [req.text] if req.texts is None else req.texts
        if not items:
            raise HTTPException(422, "\"texts\" is empty")
        if len(items) > MAX_TEXTS:
            raise HTTPException(413, f"{len(items)} texts: at most {MAX_TEXTS} a request; use "
                                "`slmflow predict --input FILE` for files")
        # Named on every call, the folder's default included: never whatever ran last.
        adapter = req.adapter if req.adapter is not None else clf.default_adapter
        try:
            preds = [p.to_dict() for p in clf.predict(items, req.constrained, adapter=adapter)]
        except (InputError, UnknownAdapterError) as exc:
            raise HTTPException(422, str(exc)) from None
        said = {"adapter": adapter} if adapter is not None else {}
        return preds[0] | said if req.texts is None else {"predictions": preds} | said

    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Load the folder, then serve until interrupted."""
    import uvicorn

    from slmflow.classifier import Classifier

    clf = Classifier(model)
    held = (f" with adapters {', '.join(clf.adapters)} (default {clf.default_adapter})"
            if clf.adapters else "")
    print(f"serving {model}{held} on http://{host}:{port} (POST /classify, GET /health)", flush=True)
    uvicorn.run(create_app(clf), host=host, port=port, log_level="warning")
    return 0
