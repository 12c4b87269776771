"""The naive baseline of issue 7: a minimal FastAPI + sqlmodel ``GET /v1/jobs/{id}`` on SQLite with a sync
session dependency and a bearer check, served by one uvicorn worker. Nothing else (no middleware, no
metrics, no request ids).

    python bench/naive_app.py --port 8123 --db /tmp/naive.db --key secret

(No ``from __future__ import annotations``: FastAPI must resolve the closures' annotations at definition.)
"""

import argparse
import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException
from sqlmodel import Field, Session, SQLModel, create_engine, select


class Job(SQLModel, table=True):
    id: str = Field(primary_key=True)
    tenant: str = Field(index=True)
    name: str | None = None
    method: str
    status: str
    hyperparameters: str = "{}"


def build(db_path: str, key: str) -> FastAPI:
    engine = create_engine(f"sqlite:///{db_path}", connect_args={"check_same_thread": False})
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        if session.get(Job, "job_bench") is None:
            session.add(Job(id="job_bench", tenant="bench", name="bench", method="sft", status="queued"))
            session.commit()
    app = FastAPI()

    def get_session() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    def get_tenant(authorization: Annotated[str, Header()] = "") -> str:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
            raise HTTPException(401, "invalid api key")
        return "bench"

    @app.get("/v1/jobs/{job_id}")
    def get_job(
        job_id: str,
        session: Annotated[Session, Depends(get_session)],
        tenant: Annotated[str, Depends(get_tenant)],
    ) -> Job:
        job = session.exec(select(Job).where(Job.id == job_id, Job.tenant == tenant)).first()
        if job is None:
            raise HTTPException(404, "not found")
        return job

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    uvicorn.run(build(args.db, args.key), host="127.0.0.1", port=args.port, log_level="warning", workers=None)


if __name__ == "__main__":
    main()
