"""Asymmetric embedding models: documents and queries each with the model's own prompt (no Ray)."""

import json
import shutil

import numpy as np
import pytest

from actors.embedder import Embedder
from pipelines.data.embedding import EmbedConfig


@pytest.fixture(scope="module")
def prompted_embedder(tiny_models, tmp_path_factory) -> str:
    """The tiny kit's embedder with two prompts, as EmbeddingGemma's folder declares them."""
    folder = tmp_path_factory.mktemp("emb") / "prompted"
    shutil.copytree(tiny_models["embedder"], folder, symlinks=False)
    path = folder / "config_sentence_transformers.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config["prompts"] = {"query": "task: search result | query: ", "document": "title: none | text: "}
    path.write_text(json.dumps(config))
    return str(folder)


def test_documents_and_queries_get_their_own_prompt(prompted_embedder):
    config = EmbedConfig(model=prompted_embedder, document_prompt="document", query_prompt="query")
    documents, queries = Embedder(config, "cpu", corpus=True), Embedder(config, "cpu", corpus=False)
    plain = Embedder(EmbedConfig(model=prompted_embedder), "cpu")
    text = "网上有人散布谣言"
    assert np.allclose(documents.encode([text]), plain.encode(["title: none | text: " + text]), atol=1e-5)
    assert np.allclose(queries.encode([text]), plain.encode(["task: search result | query: " + text]), atol=1e-5)
    assert not np.allclose(documents.encode([text]), queries.encode([text]), atol=1e-3)


def test_an_unknown_prompt_names_the_models_prompts(prompted_embedder):
    with pytest.raises(ValueError, match=r"has no prompt 'passage' \(its prompts: \['document', 'query'\]\)"):
        Embedder(EmbedConfig(model=prompted_embedder, document_prompt="passage"), "cpu")
