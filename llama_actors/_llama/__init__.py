"""The llama.cpp backend: boot specs, the probed llama-server binary, and rendering a
spec into a launch plan for that binary."""
