"""Online methods: the generic rollout loop (sample -> score -> experience -> update) and the
algorithms that plug into it."""
