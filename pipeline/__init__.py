"""One thin script per DVC stage: parse paths, load params, call the library, write, log."""
