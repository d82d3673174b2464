"""Shipped assets (tokenizer, model weights, dictionaries) and the command that rebuilds them.

``python -m course_utils.assets build`` retrains the course model from the stdlib corpus;
``python -m course_utils.assets evaluate`` re-measures the shipped one; ``info`` prints its record.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
