"""The core's Ollama, rerank and tokenize API tests, unchanged, through the cluster's
ingress. Left out: Ollama's ``/api/ps`` and loading or unloading with ``keep_alive``,
which read and hold one machine's instances (on a cluster they answer 501, see
test_what_only_one_machine_has_is_refused_clearly)."""

import httpx
import pytest
from test_api_ollama import *  # noqa: F401,F403
from test_api_rerank import (  # noqa: F401
    test_an_embedding_model_reranks_by_cosine,
    test_bad_input_gets_openais_error_shape,
    test_rerank_orders_by_relevance,
    test_tokenize_and_detokenize,
    test_top_n_and_return_documents,
)
from test_api_rerank import http  # noqa: F401 (the rerank tests' client)

del test_ps_lists_loaded_instances_and_keep_alive_unloads  # noqa: F821
pytestmark = pytest.mark.timeout(180)


def test_what_only_one_machine_has_is_refused_clearly(apis_server):
    for method, path, body in (("GET", "/api/ps", None), ("POST", "/api/generate", {"model": "chat", "prompt": ""})):
        response = httpx.request(method, apis_server.url(path), json=body, timeout=20)
        assert response.status_code == 501
        assert "cluster" in response.text
