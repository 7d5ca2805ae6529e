"""Hosts: the agent that runs one host's servers for a head, and Ray as the way to
start agents on the hosts of a cluster (CONTRACT §12)."""
