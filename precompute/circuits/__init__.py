"""Attribution graphs (circuit-tracer definitions) on transcoders: replacement model, graph, pruning, checks, export."""
