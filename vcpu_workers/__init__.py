"""vcpu_workers: the vCPU worker processes (uffd registration + hand-off, workloads, verification)."""
