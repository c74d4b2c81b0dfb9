"""Serving a tuned model: `kubetune-serve`, an OpenAI-compatible HTTP server with dynamic batching.

Modules: server (HTTP app and command line), engine (the batching model worker), sampling
(per-sequence next-token choice), text (incremental detokenization, stop strings), protocol
(OpenAI request/response shapes), loader (model or adapter + base from any location),
metrics (Prometheus kubetune_serve_*).
"""
