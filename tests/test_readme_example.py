import re
import subprocess
import sys
from pathlib import Path

from wkvq_core import (CalibConfig, WeightQuantConfig, WKVQuantConfig, calibration_samples, quantize_model_,
                       save_artifact)

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path):
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "quantize_model_" in block]
    code = code.replace("nsamples=64", "nsamples=4").replace(", 64, 256,", ", 4, 256,")
    result = subprocess.run([sys.executable, "-c", code], cwd=README.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert 6.0 < float(result.stdout.strip().splitlines()[-1]) < 12.0


def test_readme_load_and_generate_example_runs(tmp_path, tiny_model, tokenizer, calib_ids):
    cfg = WKVQuantConfig(weight=WeightQuantConfig(group_size=-1), calib=CalibConfig(nsamples=2, seqlen=64, epochs=0))
    quantize_model_(tiny_model, cfg, calibration_samples(calib_ids, 2, 64, seed=0))
    artifact = save_artifact(tmp_path / "w4kv4", tiny_model, tokenizer, cfg)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (code,) = [block for block in blocks if "AutoModelForCausalLM.from_pretrained" in block]
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
    sources = "\n".join(p.read_text() for p in (README.parent / "wkvq_core").rglob("*.py"))
    for banned in ("fastapi", "sqlalchemy", "celery", "redis", "import api", "import worker"):
        assert banned not in sources
