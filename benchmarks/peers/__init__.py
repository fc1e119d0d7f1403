"""The torch peers the benchmarks measure ours against, written as a user of torch would: each
file runs as a script (``python benchmarks/peers/NAME.py JSON``) and prints one result line,
the JSON after a mark, that its driver parses."""
