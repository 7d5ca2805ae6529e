"""The kernel's pure logic: public value types, manifests and compatibility, the backend
protocol, leases, policies and restart decisions, readiness and health classification.
No threads and no actors; time is always passed in."""
