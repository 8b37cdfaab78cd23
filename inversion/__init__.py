"""Personalization by embedding inversion: Textual Inversion, NeTI and HiPer."""
