"""Sandbox of the Twilio Comms SenderPool Operations API, for the demo and the tests."""

from worker.sandbox.server import SandboxServer, serve_forever
from worker.sandbox.simulation import Fault, SimulatedOperation, Simulation

__all__ = ["Fault", "SandboxServer", "SimulatedOperation", "Simulation", "serve_forever"]
