"""The learner: one training loop, continual-learning methods as hooks, the ClientApp adapter."""
