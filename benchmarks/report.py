"""The end of every benchmark script: write the JSON report atomically (temporary file, then rename) and print it
as the output's last line."""

import json
import os
from pathlib import Path


def finish(report: dict, out: Path) -> dict:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps(report))
    return report
