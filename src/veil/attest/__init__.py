"""The attestation and provisioning protocol both sides speak: evidence, report formats, the verifier's
policy and checks (server side), and the wrap of the embedding weights for an attested enclave."""
