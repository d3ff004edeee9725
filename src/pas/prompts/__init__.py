"""Prompt templates (package data): one `.txt` per prompt, `{name}`-style fields, read by `pas.concepts.discovery.load_prompt`."""
