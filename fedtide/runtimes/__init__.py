"""How a run executes: the same ServerApp and ClientApp in this process (``inprocess``), under
Flower's simulation engine (``flower_engine``), or as real Flower processes (``flower_processes``)."""
