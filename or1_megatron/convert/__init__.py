"""Hugging Face <-> Megatron parameter mappings, shared by the offline converter and the weight sync."""
