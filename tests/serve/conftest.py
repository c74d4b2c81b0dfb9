"""Fixtures for the serving tests: the tiny model loaded once, reference generation with
`model.generate`, and real servers (uvicorn on 127.0.0.1) talked to with the `openai` client."""

from __future__ import annotations

import contextlib

import pytest


@pytest.fixture(scope="session")
def tiny(tiny_model_dir, tmp_path_factory):
    """The tiny model as the server loads it (LoadedModel: model, tokenizer, path)."""
    from kubetune.serve.loader import load_model

    return load_model(str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("serve-cache"))


@pytest.fixture
def start_server(tiny):
    """Factory: start_server(settings=..., start_engine=True, tokenizer=None, **engine_kwargs) -> (url, engine)."""
    from kubetune.serve.engine import Engine
    from kubetune.serve.server import BackgroundServer, ServeSettings, create_app

    with contextlib.ExitStack() as stack:

        def start(settings: ServeSettings | None = None, start_engine: bool = True, tokenizer=None, **engine_kwargs):
            engine = Engine(tiny.model, tokenizer or tiny.tokenizer, **engine_kwargs)
            if start_engine:
                engine.start()
            stack.callback(engine.stop)
            app = create_app(settings or ServeSettings("tiny"), engine=engine)
            server = stack.enter_context(BackgroundServer(app))
            return server.url, engine

        yield start
