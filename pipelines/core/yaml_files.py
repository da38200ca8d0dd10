"""Reading a YAML file the project's way: a missing file or invalid YAML is one line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_file(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The YAML document in ``path`` (``None`` for an empty file). A missing file raises ``error``
    ("<what> does not exist: <path>"), invalid YAML ``error`` ("<what> <path> is not valid YAML:
    <the parser's message on one line>")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} does not exist: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {' '.join(str(exc).split())}") from None
