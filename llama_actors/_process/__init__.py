"""The process seam: start a server from a launch plan in its own process group, stream
its output, see it exit, stop it, and make sure it never outlives its owner (lifeline
guard, ledger, reaping). It knows a plan, never a boot spec, readiness or leases."""
