"""IIoT telemetry orchestration: core settings, database, migrations, resources and CLI."""

__version__ = "0.1.0"
