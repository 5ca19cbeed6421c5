"""The pytest suite of densenet-suite (nothing a user's program imports lives here)."""
