"""vm tier: QEMU boots of Debian kernels with kvm_amd; payload.py runs inside L1."""
