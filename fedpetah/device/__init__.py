"""The device side of a round: what a client does with a request (client), its verified backbone cache, simulated
shards and one task's training (local). Imports the library and routing, never the server side."""
