"""Training: the one loop fit(), the Distiller, the sample selectors (full data, SAKD) and spot routing
that drive it, resume, and the frozen teacher's runtimes and output cache."""
