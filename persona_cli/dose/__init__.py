"""Dose response: plan the arms x doses x seeds grid, run its cells, summarise them."""
