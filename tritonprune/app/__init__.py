"""The command line (`tritonprune demo | bench | inspect`), the demo, the benchmark and the example models."""
