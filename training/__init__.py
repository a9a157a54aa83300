"""mtpf training."""

# NER adaptation (mtpf-adapt, mtpf-compare): train at least this many optimizer steps, with
# more epochs on small training sets. Chosen on dev splits with the base encoder only:
# docs/results.md, "The adaptation budget".
NER_MIN_STEPS = 300
