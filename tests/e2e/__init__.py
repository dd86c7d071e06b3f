"""End to end: model families, property tests, the CLI error matrix, quickstart, benchmarks."""
