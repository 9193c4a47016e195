"""Curation, rejection sampling, SFT, DPO and GRPO (TRL) on logged conversations."""
