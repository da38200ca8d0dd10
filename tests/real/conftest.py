"""The real-model lane (`make test-real`): the project's stages on real pretrained weights and the
human-labelled Chinese data, where both are on this machine; skipped otherwise, naming how to get
them. Folders: ``$REAL_MODELS`` (default ``models/real``) as built by
``.venv/bin/python ../shared/models/fetch_real_models.py DIR``; data: ``$CHILLGUARD_SHARED_DATA``
(default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO

FOLDERS = {"instruct": "qwen2.5-coder-1.5b-instruct", "backbone": "gemma-3-270m", "embedder": "embeddinggemma-300m"}


def real_models_dir() -> Path:
    return Path(os.environ.get("REAL_MODELS", REPO / "models" / "real")).expanduser().resolve()


@pytest.fixture(scope="session")
def real_models() -> dict[str, str]:
    root = real_models_dir()
    missing = [name for name in FOLDERS.values() if not (root / name / "config.json").is_file()]
    if missing:
        pytest.skip(f"no real models in {root} ({', '.join(missing)} missing): build them with "
                    f"`.venv/bin/python ../shared/models/fetch_real_models.py {root}` or set REAL_MODELS")
    return {role: str(root / name) for role, name in FOLDERS.items()}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = Path(os.environ.get("CHILLGUARD_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()
    if not (root / "toxicn" / "train.jsonl").is_file():
        pytest.skip(f"no ToxiCN in {root}/toxicn: set CHILLGUARD_SHARED_DATA to the folder holding toxicn/")
    return root
