"""Ray glue over pcdarts_core: sweeps (Tune + Optuna), distributed search (Train), results, evaluation."""
