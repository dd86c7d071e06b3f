"""Tests of lora_fx/match/: every matcher form, MultiheadAttention sites, targeting."""
