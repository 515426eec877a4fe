"""The client enclave: its platforms (simulated, configfs-tsm), its key pair, the embedding weights it
holds, and their sealed state. Measured together with `veil.privacy` (see `veil.enclave.simulated`)."""
