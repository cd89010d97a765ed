"""Reinforcement-learning building blocks: returns, losses and learners."""
