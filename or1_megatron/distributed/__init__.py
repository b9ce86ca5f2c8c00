"""Process launching and process-group set-up shared by the trainer, tools and tests."""
