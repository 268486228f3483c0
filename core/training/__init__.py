"""Training: the one loop (train), losses, evaluation, the one checkpoint format, augmented views, the collection
shortcut probes and the server's distillation (teacher, baseline student, KD student)."""
