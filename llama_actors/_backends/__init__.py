"""The backends: llama.cpp and ``attach`` built in, and the registry of all of them."""
