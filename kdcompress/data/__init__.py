"""Data: the raw sources (IDX, CIFAR, image folders), the prepared splits prepare writes, and the
loaders training and evaluation read them with."""
