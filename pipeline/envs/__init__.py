"""Batched torch environments for meta-RL task families."""
