"""Evaluation: benchmark loaders (local files, published formats), metrics, runner and report."""
