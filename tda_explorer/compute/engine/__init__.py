"""The engine every method runs on: tasks and scores, per-sample gradients, projections (random and LoGra),
featurisation and the feature store, curvature and Kronecker factors, top-k, fingerprints, losses."""
