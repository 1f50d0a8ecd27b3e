"""The trainer: datasets, detector models, training, evaluation (workstation side; needs torch)."""

import os

# Bit-for-bit repeatable CPU training (trainer.train's contract, which exact resume relies on) needs Intel MKL's
# conditional numerical reproducibility. Without it, one CPU run in four to eight took another path from its first
# epoch on (cbigan, 2 threads, same seed; three different results seen in 28 runs). MKL_CBWR=AUTO,STRICT still
# gave three results in 20 runs; COMPATIBLE gave one in 18 (tests/test_train.py's resume test failed 3 of 4 runs
# without it). MKL reads the variable at its first call, so setting it here, before torch computes anything, is
# enough for the command line; a user's own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
