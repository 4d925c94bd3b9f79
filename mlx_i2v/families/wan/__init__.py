"""The Wan family (Wan2.1 I2V/FLF2V-14B, Wan2.2 TI2V-5B and I2V-A14B): variants, memory model, loader."""
