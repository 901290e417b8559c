"""End-to-end benchmarks (``diode bench link|tags|...``): daemons as child processes."""
