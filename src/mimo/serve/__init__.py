"""Serving: OpenAI- and Anthropic-compatible HTTP API, the text layer (incremental detokenisation, stop
strings, reasoning and tool-call parsing), metrics and the web chat page, above the engine.

Nothing below (model, engine, train) imports this package.
"""
