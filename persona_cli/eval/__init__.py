"""Evaluations over generated samples: marker rates (`markers`, `score`, `heatmap`).

persona-cli eval-markers --help
"""
