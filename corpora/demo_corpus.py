"""The bundled demo corpus: documents of a fictional organisation and a QA file about them."""

import json
from pathlib import Path

DEMO_ROOT = Path(__file__).parent / "demo"
DEMO_DOCS = DEMO_ROOT / "docs"
DEMO_QA = DEMO_ROOT / "qa.jsonl"


def load_demo_qa() -> list[dict]:
    """Questions with `question`, `answer` (a short gold string), `source` (docs/…) and `kind`."""
    return [json.loads(line) for line in DEMO_QA.read_text().splitlines() if line.strip()]
