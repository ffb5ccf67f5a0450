"""Studies that reproduce published results end to end (the superposition benchmark)."""
