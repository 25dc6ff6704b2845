"""The model worker: a separate process holding the model and SAEs, batching live requests over a JSON API.

batcher (the engine and its dynamic batching), routes (the HTTP API), wire (its pydantic models, shared with the
client), engine (building an engine from a store or flags), client (what the dashboard uses), watchdog, main.
"""
