"""Foundations every layer may use: time (timers and the scheduler), secrets, the state
folder and duration units. Nothing here knows about servers, specs or actors."""
