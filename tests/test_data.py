import pytest
import torch

from wkvq_core.data import calibration_samples, eval_windows, load_text
from wkvq_core.errors import DataError


def test_hf_spec_loads_through_datasets(tmp_path):
    """`hf:NAME:SPLIT[:FIELD]` goes through `datasets.load_dataset`; NAME may be a local dataset directory."""
    (tmp_path / "train.txt").write_text("first line\nsecond line\n")
    assert load_text(f"hf:{tmp_path}:train") == "first line\n\nsecond line"
    with pytest.raises(DataError, match="no field 'body'"):
        load_text(f"hf:{tmp_path}:default:train:body")


def test_hf_spec_offline_or_malformed_is_a_clear_error():
    with pytest.raises(DataError, match="cannot load dataset from the Hugging Face hub"):
        load_text("hf:wikitext:wikitext-2-raw-v1:train")
    with pytest.raises(DataError, match="expected hf:NAME"):
        load_text("hf:wikitext")


def test_directory_of_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "skip.md").write_text("not text")
    assert load_text(str(tmp_path)) == "ay\n\nbee"


def test_samples_are_seeded_windows_of_the_text():
    ids = torch.arange(1000)
    a, b = calibration_samples(ids, 8, 64, seed=3), calibration_samples(ids, 8, 64, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, calibration_samples(ids, 8, 64, seed=4))
    assert a.shape == (8, 64) and ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows
    with pytest.raises(DataError, match="1000 tokens; one sample needs seqlen=2048"):
        calibration_samples(ids, 8, 2048, seed=0)


def test_eval_windows_do_not_overlap():
    windows = eval_windows(torch.arange(1000), 300)
    assert windows.shape == (3, 300) and torch.equal(windows.flatten(), torch.arange(900))
