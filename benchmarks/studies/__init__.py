"""Studies: measurements behind a choice or a claim (the budget, ED against
distillation, teacher speed, drift), as opposed to the runner a user runs."""
