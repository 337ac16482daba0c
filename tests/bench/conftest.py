"""Keep pytest out of tests/bench: these are benchmarks run by hand with run.py."""

collect_ignore_glob = ["*"]
