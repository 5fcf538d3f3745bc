"""Example: fedtide's continual-learning client inside your own Flower ClientApp."""
