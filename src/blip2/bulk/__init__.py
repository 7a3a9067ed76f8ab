"""Labelling whole datasets: `blip2 caption / ask / instruct --input` (run.py) with exactly-once part files (ledger.py)."""
