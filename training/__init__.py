"""mtpf training."""
