"""What an elastic checkpoint is: budgets, engine options, per-family declarations."""
