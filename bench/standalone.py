"""The command line of a standalone benchmark script (one not in bench.run_cpu's set):
`--workdir DIR` (default: a temporary folder) and `--out FILE`; the figures are printed as
JSON and, with --out, written there too."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable


def main(doc: str, run: Callable[..., dict], **options: tuple[type, object, str]) -> None:
    """Parse the command line and run `run(workdir, **options)`; `options` maps each extra
    option's name to (type, default, help)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    for name, (kind, default, text) in options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text)
    args = vars(parser.parse_args())
    workdir, out = args.pop("workdir"), args.pop("out")
    text = json.dumps(run(workdir or Path(tempfile.mkdtemp(prefix="kubetune-bench-")), **args), indent=1)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
