from pathlib import Path

import pytest
import torch

from tests.conftest import EVAL_TEXT
from wkvq_core.calib.data import calibration_samples, eval_windows, evaluation_ids, load_text, tokenize
from wkvq_core.calib.estimate import TOKENIZE_CHUNK_CHARS
from wkvq_core.errors import DataError


def cached_hub_dataset(monkeypatch, cache: Path, repo_id: str) -> Path:
    """A snapshot of hub dataset `repo_id` in a hub cache at `cache` (as `snapshot_download` leaves one); returns
    the snapshot directory."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    storage = cache / f"datasets--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text("0" * 40)
    snapshot = storage / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    return snapshot


def test_hf_spec_loads_the_hub_snapshot_through_datasets(tmp_path, monkeypatch):
    """`hf:NAME:SPLIT[:FIELD]`: the hub dataset's snapshot (here already in the hub cache, offline) goes through
    `datasets.load_dataset`."""
    snapshot = cached_hub_dataset(monkeypatch, tmp_path / "hub", "some-org/notes")
    (snapshot / "train.txt").write_text("first line\nsecond line\n")
    assert load_text("hf:some-org/notes:train") == "first line\n\nsecond line"
    with pytest.raises(DataError, match="no field 'body'"):
        load_text("hf:some-org/notes:default:train:body")


def test_hf_spec_never_reads_a_local_directory(tmp_path, monkeypatch):
    """A hub name that is also a local directory (relative to the cwd, as the service's data directory is) names
    the hub dataset only: the directory's text is never read."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wkvq-data" / "store").mkdir(parents=True)
    (tmp_path / "wkvq-data" / "store" / "train.txt").write_text("another team's secret text\n")
    for spec in ("hf:wkvq-data:train", "hf:wkvq-data/store:train", f"hf:{tmp_path}/wkvq-data:train",
                 "hf:./wkvq-data:train", "hf:../wkvq-data:train"):
        with pytest.raises(DataError, match="Hugging Face") as raised:
            load_text(spec)
        assert "secret" not in str(raised.value)


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


def test_tokenized_in_pieces_the_ids_equal_the_whole_texts(tokenizer):
    """Texts are tokenized in TOKENIZE_CHUNK_CHARS pieces (issue 24: a whole 16 MiB text took 2.2 GB), into int32;
    the ids are the whole text's, and `max_tokens` / `evaluation_ids` stop early."""
    text = EVAL_TEXT.read_text(encoding="utf-8")
    text = text * (3 * TOKENIZE_CHUNK_CHARS // len(text) + 1)  # several pieces
    whole = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = tokenize(tokenizer, text)
    assert ids.dtype == torch.int32 and ids.tolist() == whole
    assert tokenize(tokenizer, text, max_tokens=1000).tolist() == whole[:1000]
    head, more = evaluation_ids(tokenizer, text, 1000)
    assert head.tolist() == whole[:1000] and more
    assert not evaluation_ids(tokenizer, text, len(whole))[1]  # exactly the text's tokens: nothing cut
    assert eval_windows(ids, 256).dtype == torch.long  # cross_entropy targets
