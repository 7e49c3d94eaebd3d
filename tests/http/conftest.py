"""A tiny-model cluster with the HTTP front end on a free port and an API key set.

The tiny test tokenizer has no chat template; ``chat_model`` is a copy of the
tiny model with one, so /v1/chat/completions can be tested on it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey
from tests.http.support import CHAT_TEMPLATE, HttpCluster


@pytest.fixture(scope="session")
def chat_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("http") / "tiny-chat")
    shutil.copytree(tiny_model, path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def http_cluster(chat_model: str, valkey: EmbeddedValkey) -> Iterator[HttpCluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    cluster = HttpCluster(chat_model, valkey.url, worker={"metrics_port": 0})
    cluster.start()
    yield cluster
    cluster.stop()
