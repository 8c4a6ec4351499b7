"""A scale simulator: one process plays many worker hosts on a real Redis (``fleet``), and a
measurement that runs it under real routers (``measure``). See docs/BENCHMARKS.md, "Scale"."""
