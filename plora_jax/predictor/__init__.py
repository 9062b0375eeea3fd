"""The traffic predictor as the runtime uses it: the trace readers (`traces`), the features
(`features`), the Flax LSTM and its checkpoint (`model`, the shipped one in `checkpoint/`) and
the online forecaster (`forecaster`). Training and evaluation live in `train_predictor`, which
imports from here, never the other way."""
