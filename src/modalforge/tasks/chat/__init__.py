"""The multimodal chat task: a small LLM with image and audio towers, trained on conversations."""
