"""The scorer: runs the CNN and the trust decision on batches of matrices."""
