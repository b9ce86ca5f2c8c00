"""Data: problem records, loaders for the supported data sets, chat template, tokenizer, filters.

Modules: records (ProblemRecord, DataError, SkipCounter), readers (file formats), loaders (row
schemas), chat_template, tokenizer, filters (length, offline, online), decontamination.
"""
