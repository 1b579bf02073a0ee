"""Generation: KV cache, sampling, and the token -> text stream stack."""
