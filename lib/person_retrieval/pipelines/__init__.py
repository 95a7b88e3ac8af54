"""The papers' pipelines, built on the assistants and the retrieval models (one module per paper)."""
