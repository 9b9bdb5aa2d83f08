"""Test-only re-implementations of the LoRA key rules of ComfyUI and A1111/Forge (read from their sources)."""
