"""mtpf export."""
