"""Models: the small reference models of the built-in tasks, the transformer, the packaged MiniLM encoder, and
proxy models for limited access."""
