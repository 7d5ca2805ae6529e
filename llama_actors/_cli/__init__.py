"""The command line: ``llama-actors`` (render, run, reap, up, status, demo) and the
config file format that ``up`` reads."""
