"""The llama.cpp backend: boot specs, the probed llama-server binary, rendering a spec
into a launch plan for that binary, and the backend that puts them behind the protocol."""
