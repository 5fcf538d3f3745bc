"""Example: fedtide's validated, robust strategy inside your own Flower ServerApp."""
