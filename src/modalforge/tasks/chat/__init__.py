"""The chat task: a LLaVA-style multimodal LLM (Gemma-3 with image and audio towers)."""
