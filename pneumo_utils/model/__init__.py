"""Models: cue-removing input layers (`preprocessing`), backbones, weights and heads
(`backbones`), the frozen-backbone feature cache (`features`), training helpers (`train`),
ensembles (`ensemble`) and the saved-model contract, a `.keras` file plus its sidecar
(`saving`)."""
