"""Models: cue-removing input layers (`preprocessing`), backbones, weights and heads
(`backbones`), the frozen-backbone feature cache (`features`), training helpers (`train`),
ensembles (`ensemble`), the saved-model contract, a `.keras` file plus its sidecar
(`saving`), the model card (`card`) and a run's trained models saved with both (`run_record`)."""
