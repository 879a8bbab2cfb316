"""Manifests, schema inference, validation, splits and per-modality preprocessing."""
