"""ORM models, one file per table; importing this package registers them all on `Base.metadata`."""

from ..core.db import Base
from .api_key import ApiKey
from .artifact import Artifact
from .block_checkpoint import BlockCheckpoint
from .dashboard_session import DashboardSession
from .dataset import Dataset
from .job import Job, JobStatus
from .job_event import JobEvent
from .job_metrics import JobMetrics
from .team import Team
from .worker import Worker

__all__ = ["ApiKey", "Artifact", "Base", "BlockCheckpoint", "DashboardSession", "Dataset", "Job", "JobEvent", "JobMetrics", "JobStatus", "Team", "Worker"]
