"""File formats every stage writes: atomic output (``atomic``), a minimal GGUF container writer
(``gguf_writer``) and GGUF key names (``gguf_keys``)."""
