"""One stream on several GPUs (or CPU processes): the generator's passes split by sequence, decoding elsewhere."""
