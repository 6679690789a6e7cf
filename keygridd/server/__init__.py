"""trio I/O only: the listener, connections, the dispatcher's scheduling, lifecycle."""
