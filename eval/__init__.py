"""Evaluation of speculative decoding: benchmark suites, metrics, scoring, sandbox and reports."""
