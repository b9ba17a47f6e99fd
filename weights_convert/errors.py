class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message is one line for people."""
