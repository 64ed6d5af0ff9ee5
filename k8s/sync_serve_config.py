"""Copy deployments/production.yaml into k8s/rayservice.yaml as spec.serveConfigV2.

Usage: ``python k8s/sync_serve_config.py`` (rewrites k8s/rayservice.yaml in place) or
``python k8s/sync_serve_config.py --check`` (exit 1 when the two differ). The block scalar after
``serveConfigV2: |`` is replaced by the production config, indented to match.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "deployments" / "production.yaml"
TARGET = ROOT / "k8s" / "rayservice.yaml"
KEY = "serveConfigV2: |"


def render(rayservice_text: str, serve_config_text: str) -> str:
    """``rayservice_text`` with the serveConfigV2 block replaced by ``serve_config_text``."""
    lines = rayservice_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == KEY]
    if len(starts) != 1:
        raise SystemExit(f"expected one '{KEY}' line in {TARGET}, found {len(starts)}")
    start = starts[0]
    indent = len(lines[start]) - len(lines[start].lstrip()) + 2
    end = start + 1
    def inside(line: str) -> bool:
        return not line.strip() or len(line) - len(line.lstrip()) >= indent

    while end < len(lines) and inside(lines[end]):
        end += 1
    block = [(" " * indent + line).rstrip() for line in serve_config_text.rstrip("\n").splitlines()]
    return "\n".join(lines[: start + 1] + block + lines[end:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if rayservice.yaml is out of date")
    args = parser.parse_args(argv)
    current = TARGET.read_text()
    wanted = render(current, SOURCE.read_text())
    if args.check:
        if current != wanted:
            sys.stderr.write(f"{TARGET} is out of date: run python k8s/sync_serve_config.py\n")
            return 1
        return 0
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
