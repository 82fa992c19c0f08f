import re
import subprocess
import sys
from pathlib import Path


README = Path(__file__).parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path):
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "quantize_model_" in block]
    code = code.replace("nsamples=64", "nsamples=4").replace(", 64, 256,", ", 4, 256,")
    result = subprocess.run([sys.executable, "-c", code], cwd=README.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert 6.0 < float(result.stdout.strip().splitlines()[-1]) < 12.0


def test_library_does_not_import_service_code():
    sources = "\n".join(p.read_text() for p in (README.parent / "wkvq_core").glob("*.py"))
    for banned in ("fastapi", "sqlalchemy", "celery", "redis", "import api", "import worker"):
        assert banned not in sources
