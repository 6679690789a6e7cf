"""Providers: one backend each, behind the small interface in ``base.py``."""
