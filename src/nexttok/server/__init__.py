"""``nexttok serve``: an OpenAI-compatible HTTP server over one scheduler that owns the model (docs/serve.md)."""
