"""Post-training phases on the run scaffold: DPO on preference pairs."""
