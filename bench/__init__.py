"""Benchmark harness and the fake OpenRouter upstream it shares with the test suite."""
