"""Render every setting (env name, type, default, description) as markdown: docs/settings.md.

``python -m tools.settings_doc > docs/settings.md`` regenerates it; a unit test keeps the
committed file equal to the code, so each setting is documented exactly once, in config.py.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from elbert_stream.config import Settings


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, SecretStr):
        return "(secret)"
    return f"`{json.dumps(value)}`"


def _type(field: Any) -> str:
    text = str(field.annotation).replace("typing.", "").replace("pydantic.types.", "")
    return text.replace("<class '", "").replace("'>", "").replace("|", "\\|")


def render() -> str:
    lines = [
        "# Settings",
        "",
        "Generated from `elbert_stream/config.py` by `python -m tools.settings_doc`; do not edit.",
        "Every setting can be set from the environment: prefix `ELBERT_`, sections joined by `__`",
        "(e.g. `ELBERT_KAFKA__BOOTSTRAP_SERVERS=broker:9092`, `ELBERT_EXIT__TAU=0.2`; lists as JSON).",
        "Secrets are `SecretStr`: never logged, never in `/stats` or traces.",
        "",
    ]
    for section, sfield in Settings.model_fields.items():
        model = sfield.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"settings section {section!r} is not a pydantic model: {model!r}")
        lines += [f"## `{section}`", ""]
        doc = (model.__doc__ or "").strip().splitlines()
        if doc and not doc[0].startswith("!!!"):
            lines += [" ".join(d.strip() for d in doc), ""]
        lines += ["| environment variable | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            env = f"ELBERT_{section.upper()}__{name.upper()}"
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{env}` | {_type(field)} | {_default(field)} | {desc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
