"""tools/: repository maintenance scripts (``python -m tools.settings_doc > docs/settings.md``)."""
