import re
import shlex
import subprocess
import sys

import pytest
import typer

from tests.pages import PAGES, README, REPO, python_blocks
from worker.cli import app
from wkvq_core import (CalibConfig, WeightQuantConfig, WKVQuantConfig, calibration_samples, quantize_model_,
                       save_artifact)


def test_readme_python_example_runs(tmp_path):
    (code,) = [block for block in python_blocks() if "quantize_model_" in block]
    code = code.replace("nsamples=64", "nsamples=4").replace(", 64, 256,", ", 4, 256,")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert 6.0 < float(result.stdout.strip().splitlines()[-1]) < 12.0


def test_readme_load_and_generate_example_runs(tmp_path, tiny_model, tokenizer, calib_ids):
    cfg = WKVQuantConfig(weight=WeightQuantConfig(group_size=-1), calib=CalibConfig(nsamples=2, seqlen=64, epochs=0))
    quantize_model_(tiny_model, cfg, calibration_samples(calib_ids, 2, 64, seed=0))
    artifact = save_artifact(tmp_path / "w4kv4", tiny_model, tokenizer, cfg)
    (code,) = [block for block in python_blocks() if "AutoModelForCausalLM.from_pretrained" in block]
    assert code.count('"runs/stories260k-w4kv4"') == 2  # the model and its tokenizer
    code = code.replace('"runs/stories260k-w4kv4"', repr(str(artifact)))
    (prompt,) = re.findall(r'tokenizer\("([^"]+)"', code)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # no warning (a deprecated cache keyword, generation flags, ...); transformers' loading progress bar is fine
    assert re.sub(r"Loading weights[^\n]*", "", result.stderr).strip() == "", result.stderr
    printed = result.stdout.strip()
    assert printed.startswith(prompt) and len(printed) > len(prompt) + 10, printed  # prompt + continuation
    assert "<s>" not in printed


def test_library_does_not_import_service_code():
    sources = "\n".join(p.read_text() for p in (REPO / "wkvq_core").rglob("*.py"))
    for banned in ("fastapi", "sqlalchemy", "celery", "redis", "import api", "import worker"):
        assert banned not in sources


def test_every_python_block_compiles():
    blocks = python_blocks()
    assert len(blocks) >= 3  # the library, the client, loading an artifact
    for block in blocks:
        compile(block, "<python block>", "exec")


def test_documented_wkvq_commands_parse():
    """Every `wkvq` command line of the pages' indented code parses with the real command (nothing runs): a renamed
    command or option fails."""
    root = typer.main.get_command(app)
    checked = 0
    for page in PAGES:
        for line in re.findall(r"^ {4}(.*\bwkvq .*)$", page.read_text(), re.M):
            for part in re.split(r";|&&", line):
                words = shlex.split(part, comments=True)
                names = [word.rsplit("/", 1)[-1] for word in words]  # .venv/bin/wkvq too
                if "wkvq" not in names:
                    continue
                command, args = root, words[names.index("wkvq") + 1:]
                while hasattr(command, "commands"):  # a group: admin, ...
                    assert args[0] in command.commands, f"{page.name}: {part}"
                    command, args = command.commands[args[0]], args[1:]
                command.make_context(part, args)
                checked += 1
    assert checked >= 10


FENCED = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where `](` is not a link."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))


def _anchors(page) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCED.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    targets = re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text()))
    for target in targets:
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{page.name}: {target} points at no file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: {target} points at no heading"


def test_readme_is_a_front_page_linking_every_docs_page():
    assert README.stat().st_size <= 15_000
    linked = {(REPO / target).resolve() for target in re.findall(r"\]\((docs/[^)#\s]+)", README.read_text())}
    assert {page.resolve() for page in PAGES[1:]} <= linked


def _tables(page) -> list[str]:
    return re.findall(r"^(?:\|.*\n)+", page.read_text(), re.M)


def test_readme_benchmark_tables_are_the_ones_in_docs():
    tables = _tables(README)
    assert tables and set(tables) <= set(_tables(REPO / "docs" / "benchmarks.md"))
