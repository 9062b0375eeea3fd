"""Training of the LSTM traffic predictor on the Azure traces (Grain pipeline, Optax, Orbax; issue 6)."""
