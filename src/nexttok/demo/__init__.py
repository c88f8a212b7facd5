"""Worked examples that make a claim about language models concrete, end to end."""
