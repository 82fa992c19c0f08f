import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import wkvq_core  # noqa: E402
from wkvq_core.data import load_text, tokenize  # noqa: E402
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
