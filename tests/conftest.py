import contextlib
import copy
import os
import uuid
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import wkvq_core  # noqa: E402
from wkvq_core.calib.data import load_text, tokenize  # noqa: E402
from wkvq_core.model import load_model  # noqa: E402

ASSETS = Path(wkvq_core.__file__).parent / "assets"
TINY_MODEL = ASSETS / "stories260k"
CALIB_TEXT = ASSETS / "tinystories" / "calib.txt"
EVAL_TEXT = ASSETS / "tinystories" / "eval.txt"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The test models are tiny: intra-op threads gain nothing and, on a busy 2-core machine, slow them down ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _tiny():
    return load_model(TINY_MODEL)


@pytest.fixture
def tiny_model(_tiny):
    """A fresh copy of the shipped stories260k model (fp32, eval mode)."""
    return copy.deepcopy(_tiny[0])


@pytest.fixture(scope="session")
def tokenizer(_tiny):
    return _tiny[1]


@pytest.fixture(scope="session")
def calib_ids(tokenizer):
    return tokenize(tokenizer, load_text(str(CALIB_TEXT)))


@pytest.fixture(scope="session")
def eval_ids(tokenizer):
    return tokenize(tokenizer, load_text(str(EVAL_TEXT)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- PostgreSQL: throwaway databases -------------------------------------------------------------------------------
# The server is WKVQ_TEST_POSTGRES (a libpq URL of a database to connect to for CREATE/DROP DATABASE), by default the
# local trust-auth server. It is required: when it cannot be reached, the tests that need it fail, they do not skip.

PG_ADMIN_URL = os.environ.get("WKVQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_admin_connection():
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    errors = []
    for dbname in (None, "postgres"):  # the configured maintenance database, then `postgres`
        conninfo = PG_ADMIN_URL if dbname is None else make_conninfo(PG_ADMIN_URL, dbname=dbname)
        try:
            return psycopg.connect(conninfo, autocommit=True, connect_timeout=10), conninfo_to_dict(conninfo)
        except psycopg.OperationalError as exc:
            errors.append(f"{dbname or 'configured db'}: {exc}")
    pytest.fail(f"PostgreSQL is required for these tests but not reachable at {PG_ADMIN_URL}: {'; '.join(errors)}")


@contextlib.contextmanager
def fresh_pg_database(template: str | None = None):
    """Create a database with a unique name, empty or a copy of the database whose URL is `template` (which nothing may
    be connected to), yield its SQLAlchemy URL (psycopg 3 driver), drop it afterwards."""
    from psycopg import sql
    from sqlalchemy.engine import make_url

    admin, params = _pg_admin_connection()
    name = f"wkvq_test_{uuid.uuid4().hex[:12]}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(make_url(template).database))
    try:
        admin.execute(create)
        user = params.get("user", "postgres")
        password = f":{params['password']}" if params.get("password") else ""
        host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
        yield f"postgresql+psycopg://{user}{password}@{host}:{port}/{name}"
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


@pytest.fixture(scope="session")
def pg_url():
    """URL of an empty PostgreSQL database private to this test session (dropped at the end)."""
    with fresh_pg_database() as url:
        yield url


# the child's own high-water mark: ru_maxrss of a child also counts the pages of the parent it was forked from
_WKVQ_REPORTING_PEAK = ("import atexit, sys; atexit.register(lambda: print(next(line for line in open("
                        "'/proc/self/status') if line.startswith('VmHWM')), file=sys.stderr)); "
                        "from wkvq_core.cli import main; main()")


def wkvq_peak_rss(*args: str, **env: str) -> int:
    """Peak RSS in bytes of `wkvq_core.cli` run with `args` in a subprocess (which must succeed)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _WKVQ_REPORTING_PEAK, *args], capture_output=True, text=True,
                          timeout=900, env=os.environ | {"HF_HUB_OFFLINE": "1"} | env)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stderr.strip().splitlines()[-1].split()[1]) * 1024  # "VmHWM:  123456 kB"
