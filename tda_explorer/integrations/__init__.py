"""Optional adapters to other libraries (imported lazily; none is a dependency)."""
