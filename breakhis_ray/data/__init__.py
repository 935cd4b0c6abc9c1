"""Data layer: manifest (the only module that knows BreakHis names), splits, synthetic data, shards, pipelines."""
