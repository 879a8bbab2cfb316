"""Training: the LightningModule, cross-validation and ensembles."""
