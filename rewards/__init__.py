"""Style features, instruction checkers, steerability metrics and reward models.

This package never imports ``sim``: reward code only sees logged data, never the gold utility.
"""
