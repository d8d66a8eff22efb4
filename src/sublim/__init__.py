"""sublim: subliminal learning toolkit."""
