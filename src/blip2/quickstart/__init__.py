"""`blip2 quickstart`: the whole pipeline on a generated world, on a CPU."""
