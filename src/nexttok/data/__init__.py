"""Data: formats to records, chat rendering with label masks, and batch builders."""
