"""postcopy_core: the kernel interface, RAM blocks, wire protocol, source, fault handler and placement."""
