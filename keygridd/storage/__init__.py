"""Storage for the software token: raw stores (memory, lmdb, filesystem, postgresql)
and the sealing layer that encrypts records before any raw store sees them."""
