from __future__ import annotations

from fastapi import APIRouter, Response, UploadFile, status

from ..deps import AuthenticatedFirst, ContextDep, CurrentTeam, SessionDep, released
from .schemas import DatasetRead
from .service import dataset_service

router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=AuthenticatedFirst)


@router.post("", response_model=DatasetRead, status_code=status.HTTP_201_CREATED)
def upload_dataset(ctx: ContextDep, session: SessionDep, team: CurrentTeam, file: UploadFile) -> DatasetRead:
    """Upload a UTF-8 calibration text (multipart field `file`)."""
    data = file.file.read(ctx.settings.MAX_UPLOAD_BYTES + 1)
    return released(session, DatasetRead.model_validate(
        dataset_service.create(session, ctx.store, ctx.settings, team=team, filename=file.filename, data=data)))


@router.get("", response_model=list[DatasetRead])
def list_datasets(session: SessionDep, team: CurrentTeam) -> list[DatasetRead]:
    return released(session, [DatasetRead.model_validate(d) for d in dataset_service.list(session, team=team)])


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses={409: {"description": "a queued or running job uses the dataset"}})
def delete_dataset(ctx: ContextDep, session: SessionDep, team: CurrentTeam, dataset_id: str) -> Response:
    """Removes the uploaded text and its row (no tombstone); refused while a queued or running job uses it."""
    released(session, dataset_service.delete(session, ctx.store, team=team, dataset_id=dataset_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
