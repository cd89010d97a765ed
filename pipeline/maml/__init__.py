"""MAML for RL (Finn et al. 2017): batched meta-batches, second-order inner steps, a TRPO outer step."""
