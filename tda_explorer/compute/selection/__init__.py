"""Targeted data selection: LESS."""
