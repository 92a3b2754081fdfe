"""Experiments on Flower's simulation engine: the Hydra entry point (run.py) and the engine it drives (engine.py),
which runs the same ServerApp (server.app) and ClientApp (clients.app) as a deployment. In the repository, not the
wheel: it needs the server extra and configs/."""
