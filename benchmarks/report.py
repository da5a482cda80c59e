"""The end of every benchmark script: write the JSON report atomically (``mlkv.files.atomic_json``: a temporary
file, then a rename) and print it as the output's last line."""

import json
from pathlib import Path

from mlkv.files import atomic_json


def finish(report: dict, out: Path) -> dict:
    atomic_json(Path(out), report, indent=1)
    print(json.dumps(report))
    return report
