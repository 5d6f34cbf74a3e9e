"""`retrieval.backend` chooses the vector store: Qdrant Edge by default (shared with the node's other gateway
processes), a server by URL, local mode on request."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance.retrieval.edge import EdgeStore
from appliance.retrieval.edge_shared import SharedEdgeStore
from appliance.retrieval.setup import qdrant_local_path, vector_store
from appliance.retrieval.vectors import VectorStore
from appliance.settings import RetrievalSettings, Settings


def test_the_backend_is_edge_by_default_a_server_by_url_and_local_mode_on_request(tmp_path: Path) -> None:
    default = Settings(data_dir=tmp_path)
    assert default.retrieval.backend == "edge" and isinstance(vector_store(default), SharedEdgeStore)
    assert vector_store(default).where == str(tmp_path / "qdrant" / "edge")
    alone = Settings(data_dir=tmp_path, retrieval=RetrievalSettings(shared=False))
    assert isinstance(vector_store(alone), EdgeStore), "retrieval.shared off: this process only"
    server = Settings(data_dir=tmp_path, retrieval=RetrievalSettings(qdrant_url="https://127.0.0.1:6333"))
    assert server.retrieval.backend == "server", "a URL alone (configurations written before `backend`) is a server"
    assert isinstance(vector_store(server), VectorStore) and qdrant_local_path(server) is None
    local = Settings(data_dir=tmp_path, retrieval=RetrievalSettings(backend="local"))
    store = vector_store(local)
    assert isinstance(store, VectorStore) and store.where == str(tmp_path / "qdrant")
    with pytest.raises(ValidationError, match=r"needs retrieval\.qdrant_url"):
        RetrievalSettings(backend="server")
