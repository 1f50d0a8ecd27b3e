"""The trainer: datasets, detector models, training, evaluation (workstation side; needs torch)."""

import os

# Bit-for-bit repeatable CPU training (trainer.train's contract, which exact resume relies on) needs Intel MKL's
# conditional numerical reproducibility. Measured on epoch 1 of a small cbigan (2 threads, same seed, separate
# processes): with MKL's default 4 of 25 runs drifted from the others from the first epoch on (3 distinct results);
# MKL_CBWR=AUTO,STRICT 2 of 10, and with MKL_DYNAMIC=FALSE too 4 of 10; MKL_CBWR=COMPATIBLE 0 of 18.
# MKL reads the variable at its first call, so setting it here, before torch computes anything, is enough for the
# command line; a user's own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
