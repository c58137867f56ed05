"""Trained draft heads: the EAGLE-3-style head with ConFu's contemplate tokens (draft_head.py) and
its training (train.py, `specprobe train-head`)."""
