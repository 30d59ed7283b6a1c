"""The labeling HTTP API (JSON) and the ranking page, over a `Store`.

Every /api route needs `Authorization: Bearer TOKEN` (a labeler's token from `chatrlhf label labeler add`);
a labeler sees and changes only their own submissions, and /api/admin routes need an admin's token.
Errors are `{"detail": "reason"}` with 401 (token), 403 (not admin), 404 (unknown task or submission),
400/422 (malformed submission) or 409 (double submit, task not assigned to the caller).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, StrictInt

from chatrlhf.errors import UserError
from chatrlhf.labeling.store import MAX_NAME, AnswerLabel, LabelerInfo, Rejected, Store, SubmissionIn

PAGE = Path(__file__).with_name("page.html")


class AnswerBody(BaseModel):
    id: StrictInt
    rank: StrictInt
    score: StrictInt | None = None
    flags: list[str] = Field(default_factory=list)


class SubmissionBody(BaseModel):
    answers: list[AnswerBody]
    note: str = ""

    def to_store(self) -> SubmissionIn:
        return SubmissionIn(
            answers=[AnswerLabel(a.id, a.rank, a.score, list(a.flags)) for a in self.answers], note=self.note
        )


class LabelerBody(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    admin: bool = False


def caller(request: Request) -> LabelerInfo:
    """The labeler whose token the request carries; 401 without a known one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    store: Store = request.app.state.store
    labeler = store.authenticate(token.strip()) if scheme.lower() == "bearer" else None
    if labeler is None:
        raise HTTPException(
            401,
            "missing or unknown token (send Authorization: Bearer TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return labeler


Caller = Annotated[LabelerInfo, Depends(caller)]


def admin(labeler: Caller) -> LabelerInfo:
    if not labeler.admin:
        raise HTTPException(403, "this needs an admin token")
    return labeler


Admin = Annotated[LabelerInfo, Depends(admin)]


def create_app(store: Store) -> FastAPI:
    app = FastAPI(title="chatrlhf labeling", version="0.1.0")
    app.state.store = store

    @app.exception_handler(Rejected)
    async def rejected(request: Request, e: Rejected):
        return JSONResponse({"detail": e.reason}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(
            {"detail": f"{where}: {first['msg']}" if where else first["msg"]}, status_code=422
        )

    @app.get("/", response_class=HTMLResponse)
    def page():
        if not PAGE.is_file():
            raise HTTPException(404, "the labeling page is not installed")
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/me")
    def me(labeler: Caller):
        return {"name": labeler.name, "admin": labeler.admin}

    @app.get("/api/tasks/next")
    def next_task(labeler: Caller):
        view = store.next_task(labeler.id)
        if view is None:
            return {"task_id": None}
        return {
            "task_id": view.task_id,
            "prompt": view.prompt,
            "answers": [{"id": i, "text": text} for i, text in view.answers],
        }

    @app.post("/api/tasks/{task_id}/submit", status_code=201)
    def submit(task_id: int, body: SubmissionBody, labeler: Caller):
        return {"submission_id": store.submit(labeler.id, task_id, body.to_store())}

    @app.post("/api/tasks/{task_id}/skip")
    def skip(task_id: int, labeler: Caller):
        store.skip(labeler.id, task_id)
        return {"skipped": task_id}

    @app.get("/api/submissions")
    def submissions(labeler: Caller):
        return store.submissions(labeler.id)

    @app.get("/api/submissions/{submission_id}")
    def submission(submission_id: int, labeler: Caller):
        return store.submission(labeler.id, submission_id)

    @app.put("/api/submissions/{submission_id}")
    def update(submission_id: int, body: SubmissionBody, labeler: Caller):
        store.update_submission(labeler.id, submission_id, body.to_store())
        return store.submission(labeler.id, submission_id)

    @app.get("/api/admin/progress")
    def progress(_: Admin):
        return store.progress()

    @app.post("/api/admin/labelers", status_code=201)
    def add_labeler(body: LabelerBody, _: Admin):
        if not body.name.strip():
            raise HTTPException(422, "name: must not be blank")
        try:
            token = store.add_labeler(body.name, body.admin)
        except UserError as e:
            raise HTTPException(409, str(e)) from None
        return {"name": body.name.strip(), "token": token}

    @app.get("/api/admin/export")
    def export(_: Admin, per_labeler: bool = False, min_labels: int = 1):
        return store.rankings(per_labeler=per_labeler, min_labels=min_labels)

    return app
