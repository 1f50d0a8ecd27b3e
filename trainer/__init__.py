"""The trainer: datasets, detector models, training, evaluation (workstation side; needs torch)."""
