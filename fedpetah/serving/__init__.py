"""The server side of a run: the backbone pipeline (pipeline), the continual schedule and the round as overridable
steps (continual, round), router statistics collected per task (collect), and the run's metrics (metrics). Imports
routing and the library, never the device side."""
