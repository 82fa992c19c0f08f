import pytest
import torch

from tests.conftest import EVAL_TEXT
from wkvq_core.data import calibration_samples, eval_windows, evaluation_ids, load_text, tokenize
from wkvq_core.errors import DataError
from wkvq_core.estimate import TOKENIZE_CHUNK_CHARS


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
