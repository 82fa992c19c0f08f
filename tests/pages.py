"""README.md and the docs/ pages: the tests that check documented examples read them all."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def python_blocks() -> list[str]:
    """Every ```python block of the pages."""
    return [block for page in PAGES for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]
