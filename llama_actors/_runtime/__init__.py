"""The runtime: the pykka actors (Supervisor, BackendActor, HealthPoller, LeaseBroker),
their messages, the status board, signals, and the faces a caller uses (Runtime,
AsyncRuntime, the actor face)."""
