"""Fact tracing: TrackStar, the two-stage (FASTTRACK-style) tracer with its verifiers, and BM25."""
