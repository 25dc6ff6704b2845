"""The model worker: a separate process holding the model and SAEs, batching live requests over a JSON API.

batcher (the engine and its dynamic batching), routes/ (the HTTP API, one router per module), chat (the
OpenAI-compatible chat route), wire (its pydantic models, shared with the client), engine (building an engine from
a store or flags), client (what the dashboard uses), watchdog, main.
"""
