"""The flips and postprocessing decided on validation cases, and cross-validation by patient group."""
