"""The adapter engine: layer kinds, the method registry, AdaptedLayer and the public API."""
