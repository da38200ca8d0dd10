"""Data construction, corpus -> prompts: keyword pool, ingestion and seed formats, embeddings, the
vector index, retrieval, RAG and prompt-engineering rewriting, preprocessing (normalisation, language
id, translation, length filter, exact and MinHash dedup)."""
