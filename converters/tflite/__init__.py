"""TFLite artifacts for the ARM profiles (run on devices by LiteRT)."""
