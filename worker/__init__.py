"""optrack: track Twilio Comms SenderPool operations to the end."""

from importlib.metadata import version

__version__ = version("optrack")  # pyproject.toml's, the one place it is written
