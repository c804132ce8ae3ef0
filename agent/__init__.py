"""seal's process: model runtime, wake cycle, CLI. It drives ``policies``, ``adapters`` and ``store``."""
