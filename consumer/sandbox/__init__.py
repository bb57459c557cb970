"""A PMS emulator (Dentally-shaped) with its rules, rate limit, webhooks out and fault knobs.

It deliberately imports nothing from the rest of ``consumer`` nor from
``statemachines``: it is the independent check of both.
"""

from consumer.sandbox.app import (
    RunningSandbox,
    make_app,
    running_sandbox,
    serve_sandbox,
)
from consumer.sandbox.state import SandboxState

__all__ = ["RunningSandbox", "SandboxState", "make_app", "running_sandbox", "serve_sandbox"]
