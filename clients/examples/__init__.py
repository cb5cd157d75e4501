"""Example replay files for ``riskctl replay`` (``make_example.py`` writes them)."""
