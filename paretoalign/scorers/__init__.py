"""Reward scorers: they judge answers (sweeps, reports, the app) and guide ARGS; the MiniLM scorer's training."""
