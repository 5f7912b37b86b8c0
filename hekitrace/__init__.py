"""hekitrace: watch KVM guests that protect their own kernel through the hypervisor."""

__version__ = "0.1.0"
