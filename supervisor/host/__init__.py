"""What makes llmsup a well-behaved process on a shared machine: the state dir, logs,
signals, file descriptors, CURVE keys, endpoints and the CPU layout."""
