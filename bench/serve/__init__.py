"""`python -m bench.serve`: the real server under HTTP load, beside the engine alone (issues 13 and 15)."""
