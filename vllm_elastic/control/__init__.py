"""Budget control: request policies, thinking markers, the per-position budget schedule,
the frontend hook, the budget logits processor, the recompute scheduler and usage."""
