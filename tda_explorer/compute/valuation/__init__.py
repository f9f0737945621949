"""Data values and group effects: In-Run Data Shapley, LAVA, UnTrac."""
